"""Train the top of the trunk and the new head on cached activations (``fit-head --train-top``): the rows of a cut
below the top, and their augmented views, go through the top's modules, which start from the model's own weights;
the bottom of the trunk never runs. Seeded: the same seed gives the same checkpoint."""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import nn

from flowerfeat import runtime
from flowerfeat.config import FitConfig
from flowerfeat.errors import FlowerfeatError
from flowerfeat.heads import TopHead, score
from flowerfeat.recipe import Recipe
from flowerfeat.rows import Holdout, Rows, epoch_windows, holdout, window_rows
from flowerfeat.train import FitResult, _epoch_line

# The pretrained top learns at 0.3 of the new layer's peak rate, its BatchNorm statistics frozen (the layers kept in
# eval mode): chosen on 20 % of the shared training photos held out, never the test split (scripts/top_settings.py;
# docs/heads.md, "Training the top", has the grid).
TOP_LR_RATIO = 0.3
TOP_LR = 3e-3
BN_STATISTICS = "freeze"  # or "update": the running statistics learn from the cached rows


# A small data set trains for more than the default epochs: at least this many steps. On 500 shared training photos
# without views (5 folds of 400, 7 steps an epoch): 4 epochs 85.4 %, 12 epochs 88.2 %, 30 epochs 89.2 % (the linear
# default head 87.6 %); the whole shared set takes 4 epochs either way (docs/heads.md, "Training the top").
TOP_MIN_STEPS = 200
TOP_EPOCHS = 4  # the default where they make TOP_MIN_STEPS steps or more


def default_epochs(train_rows: int, batch_size: int) -> int:
    """TOP_EPOCHS, or more where they would make fewer than TOP_MIN_STEPS steps."""
    per_epoch = max(1, math.ceil(train_rows / batch_size))
    return max(TOP_EPOCHS, math.ceil(TOP_MIN_STEPS / per_epoch))


def fit_top(cfg: FitConfig, log: Callable[[str], None], train=None, validation=None) -> tuple[FitResult, dict]:
    """Train the top above the cut of ``cfg.features`` (or ``train``, loaded) and a new head; the epoch is chosen on
    ``validation`` or --val-fraction where given, else the last is kept; without --epochs their number follows the
    training rows (``default_epochs``). Returns the result (its ``module`` the TopHead; ``metrics["epochs"]`` those
    run) and the features' metadata."""
    cfg = cfg.settled()
    rows = Rows(train if train is not None else cfg.features, cfg.max_memory)
    try:
        recipe = Recipe.from_attrs(rows.meta)
        cut = recipe.backbone.cut(recipe.layer)
        if not cut.trainable:
            tops = ", ".join(c.name for c in recipe.backbone.cuts().values() if c.trainable) or "none"
            raise FlowerfeatError(
                f"{rows.name}: {recipe.model} {recipe.layer} features have no top above them to train; extract a cut "
                f"below the top (for {recipe.model}: {tops}) or drop --train-top"
            )
        hold = holdout(rows, cfg, validation)
        if hold.source:
            log(f"Validation: {hold.source}")
        n_train = int((~hold.mask).sum())
        if cfg.epochs is None:
            cfg = cfg.replace(epochs=default_epochs(n_train, cfg.batch_size))
        _, top = recipe.backbone.split(recipe.found(cfg.weights).weights, cut.name)  # from the model's own weights
        module, best, history = _train(cfg, rows, hold, cut, top, log, runtime.resolve_device(cfg.device))
        result = FitResult(module.linear.weight.detach(), module.linear.bias.detach(), best, history, module)
        result.metrics.update(
            rows=int(rows.n), train_rows=n_train, val_rows=len(hold.y), streamed=bool(rows.streamed),
            validation=hold.source, top=cut.top, epochs=cfg.epochs,
        )  # fmt: skip
        return result, rows.meta
    finally:
        rows.close()


def _train(cfg: FitConfig, rows: Rows, hold: Holdout, cut, top: nn.Module, log, device: torch.device):
    """(the trained TopHead, on the CPU, the metrics of the epoch kept, every epoch's entry); trained on ``device``,
    started from the same seeded weights on any."""
    n_classes = len(rows.meta["classes"])
    dropout = cut.top_dropout if cfg.dropout is None else cfg.dropout
    lr = cfg.lr or TOP_LR
    bf16 = cut.top_bf16 and rows.meta.get("precision") == "bf16"  # as the trunk ran, where it pays (Cut.top_bf16)
    ratio = TOP_LR_RATIO if cut.top_lr_ratio is None else cut.top_lr_ratio  # the cut's own, where it has one
    log(f"Settings: top {cut.top}; lr {lr:g} for the new layer, {lr * ratio:g} for the top (one cycle); "
        f"AdamW weight decay {cfg.weight_decay:g}; label smoothing {cfg.label_smoothing:g}; dropout {dropout:g}; "
        f"batch {cfg.batch_size}; {cfg.epochs} epochs; BatchNorm statistics: {BN_STATISTICS}; "
        f"{'bf16 autocast' if bf16 else 'fp32'} on {device}")  # fmt: skip
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # seeds the new layer and the dropout; the caller's RNGs kept
        torch.manual_seed(cfg.seed)
        module = TopHead(top, cut.shape, cut.top_dim, n_classes, dropout)  # initialised on the CPU: the same anywhere
        module.top.requires_grad_(True)
        module.to(device)
        steps = _Steps(cfg, rows, hold, module, (lr * ratio, lr), log, bf16)
        history, kept = [], None
        for epoch in range(1, cfg.epochs + 1):
            entry = steps.epoch(epoch)
            if len(hold.y):
                vloss, vpred, _ = score(module, hold.x, hold.y)
                entry.update(val_loss=vloss, val_acc=float((vpred == hold.y).mean()))
                if kept is None or entry["val_acc"] > kept[0]["val_acc"]:
                    kept = (entry, copy.deepcopy(module.state_dict()))
            history.append(entry)
            log(_epoch_line(entry))
    if kept is not None:
        module.load_state_dict(kept[1])
        log(f"Kept epoch {kept[0]['epoch']} (best validation accuracy {kept[0]['val_acc']:.1%})")
    entry = kept[0] if kept is not None else history[-1]
    metrics = {"best_epoch": entry["epoch"], "lr": lr, "top_lr": lr * ratio, "dropout": dropout,
               "bn_statistics": BN_STATISTICS, "top_precision": "bf16" if bf16 else "fp32", "device": device.type,
               **{k: v for k, v in entry.items() if k not in ("epoch", "seconds")}}  # fmt: skip
    return module.cpu().eval().requires_grad_(False), metrics, history


class _Steps:
    """One run's mini-batch steps over the cached rows: AdamW with a one-cycle schedule, label smoothing."""

    def __init__(self, cfg: FitConfig, rows: Rows, hold: Holdout, module: TopHead, lrs: tuple[float, float], log,
                 bf16: bool):  # fmt: skip
        """``lrs``: the peak rates of the pretrained top and of the new layer."""
        self.cfg, self.rows, self.hold, self.module, self.log, self.bf16 = cfg, rows, hold, module, log, bf16
        groups = [{"params": module.top.parameters(), "lr": lrs[0]},
                  {"params": module.linear.parameters(), "lr": lrs[1]}]  # fmt: skip
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        per_window = window_rows(rows.dim)
        total = sum(  # the schedule's length: every epoch's batches (windows differ by epoch)
            math.ceil(len(w[~hold.mask[w]]) / cfg.batch_size)
            for e in range(1, cfg.epochs + 1) for w in epoch_windows(rows.n, rows.block, per_window, cfg.seed, e)
        )  # fmt: skip
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, list(lrs), total_steps=max(total, 1))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _train_mode(self) -> None:
        self.module.train()
        if BN_STATISTICS == "freeze":
            for m in self.module.top.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def epoch(self, epoch: int) -> dict:
        """One pass over the training rows (their views included) in shuffled mini-batches; the epoch's figures."""
        cfg, rows, t0 = self.cfg, self.rows, time.perf_counter()
        self._train_mode()
        labels, device = torch.from_numpy(rows.labels), next(self.module.parameters()).device
        running, total_loss, seen, correct, batch_i = 0.0, 0.0, 0, 0, 0
        for window in epoch_windows(rows.n, rows.block, window_rows(rows.dim), cfg.seed, epoch):
            window = window[~self.hold.mask[window]]
            x_win, y_win = torch.from_numpy(rows.take(window)), labels[window]
            for s in range(0, len(window), cfg.batch_size):
                x, y = x_win[s : s + cfg.batch_size].to(device), y_win[s : s + cfg.batch_size].to(device)
                if len(y) < 2:  # BatchNorm cannot learn statistics from one row (its step is counted, not taken)
                    self.sched.step()
                    continue
                self.opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.module(x).float()  # (B, C)
                loss = self.criterion(out, y)
                loss.backward()
                self.opt.step()
                self.sched.step()
                batch_i, running = batch_i + 1, running + loss.item()
                total_loss, seen = total_loss + loss.item() * len(y), seen + len(y)
                correct += int((out.argmax(1) == y).sum())
                if batch_i % cfg.log_every == 0:
                    self.log(f"Epoch {epoch}, Batch {batch_i} loss: {running / cfg.log_every:.16f}")
                    running = 0.0
        self.module.eval()
        return {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                "seconds": time.perf_counter() - t0}  # fmt: skip
