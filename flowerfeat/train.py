"""Fit the head (Dropout + Linear, heads.LinearHead) on cached features: mini-batch or L-BFGS, seeded, streamed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from flowerfeat import runtime, store
from flowerfeat.config import FitConfig
from flowerfeat.errors import FlowerfeatError
from flowerfeat.heads import Head, LinearHead, score
from flowerfeat.rows import Holdout, Rows, epoch_windows, holdout, window_rows

# --lr 0 (auto) sets Adam's lr to this over the mean L1 norm of a training row (a logit moves about this much a step).
AUTO_LOGIT_STEP = 2.7


@dataclass
class FitResult:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    metrics: dict
    history: list[dict] = field(default_factory=list)
    module: nn.Module | None = None  # a TopHead when the top trained too


def fit(cfg: FitConfig, log: Callable[[str], None] = lambda s: None, train=None, validation=None):
    """Train the head on ``train`` (loaded Features) or else the file ``cfg.features``, choosing its epoch on
    ``validation`` (a validation split's features or file) or on --val-fraction of the training images; returns the
    result and the features' metadata."""
    cfg = cfg.settled()
    rows = Rows(train if train is not None else cfg.features, cfg.max_memory)
    try:
        meta = rows.meta
        if len(set(rows.labels.tolist())) < 2:
            raise FlowerfeatError(f"{rows.name}: features hold fewer than 2 classes; a classifier needs at least 2")
        hold = holdout(rows, cfg, validation)
        if hold.source:
            log(f"Validation: {hold.source}")
        result = (_fit_lbfgs if cfg.solver == "lbfgs" else _fit_sgd)(cfg, rows, hold, log)
        result.metrics.update(
            rows=int(rows.n), train_rows=int((~hold.mask).sum()), val_rows=len(hold.y), streamed=bool(rows.streamed),
            validation=hold.source,
        )  # fmt: skip
        return result, meta
    finally:
        rows.close()


def fit_head(
    train: str | Path | store.Features,
    epochs: int | None = FitConfig.epochs,
    *,
    log: Callable[[str], None] | None = None,
    **options,
) -> Head:
    """Fit the replacement layer (VGG16's ``classifier[6]``) on cached training features.

    ``train`` is a feature file or features from ``load_features``; ``options`` are ``FitConfig``'s fields
    (``batch_size``, ``lr``, ``dropout``, ``solver``, ``C``, ``val_fraction``, ``seed``, ...); ``log`` receives the
    textbook's running-loss lines (pass ``print`` to see them). The same seed gives a bit-identical head.

    Example::

        head = flowerfeat.fit_head("data/features/vgg16-fc7-imagenet/train.h5", epochs=2)
        head.save("data/runs/vgg16-fc7-imagenet/head.pt")
    """
    if isinstance(train, store.Features):  # recorded in the head as its source
        loaded, path = train, Path(train.path) if train.path else Path("(features in memory)")
    else:
        loaded, path = None, store.find_features(Path(train), "train")
    if {"features", "out"} & set(options):
        raise TypeError("fit_head() takes the features as its first argument and saves nothing (use Head.save)")
    cfg = FitConfig.from_options("fit_head", options, features=path, epochs=epochs)
    return fit_config(cfg, log, loaded)


def fit_config(cfg: FitConfig, log: Callable[[str], None] | None = None, train: store.Features | None = None) -> Head:
    """The head ``cfg`` describes, fitted on ``train`` (loaded Features) or else the file ``cfg.features``; the epoch
    is chosen on the validation split's file beside it (val.h5) where there is one and no --val-fraction is asked."""
    cfg = cfg.settled()
    beside = store.sibling_split(cfg.features, "val")
    validation = beside if not cfg.val_fraction and beside != Path(cfg.features) and beside.is_file() else None
    if cfg.train_top:  # convolutions: every core
        from flowerfeat.fit_top import fit_top

        result, meta = fit_top(cfg, log or (lambda s: None), train, validation)
        cfg = cfg.replace(epochs=result.metrics["epochs"])  # as run
    else:
        with runtime.threads():
            result, meta = fit(cfg, log or (lambda s: None), train, validation)
    return Head.from_fit(result, meta, cfg)


@dataclass(frozen=True)
class Chosen:
    """The settings fit-head derives from the features where the options leave them to it, and why."""

    dropout: float
    average: int
    lr: float
    why: dict  # setting -> the reason, said in words (printed and recorded in the head)

    def line(self) -> str:
        return "Settings: " + "; ".join(
            f"{k} {getattr(self, k):.3g} ({self.why[k]})" for k in ("dropout", "average", "lr")
        )


def choose(cfg: FitConfig, meta: dict, mean_l1: float, n_rows: int = 0) -> Chosen:
    """Dropout from the layer, runs averaged, and the learning rate from the rows' scale (and, from a ridge start,
    from how far the features outnumber the ``n_rows`` training rows), unless set by options."""
    layer, model, why = meta.get("layer", ""), meta.get("model", "the model"), {}
    if cfg.dropout is not None:
        dropout, why["dropout"] = cfg.dropout, "as asked"
    else:  # the model's own classifier's dropout at the cut (backbones.Cut.dropout), recorded in the features
        dropout = float(meta.get("cut_dropout") or 0.0)
        why["dropout"] = f"{model} {layer} features: " + (
            f"its own classifier drops out {dropout:g} there" if dropout else "its own classifier applies no dropout"
        )
    average = cfg.average
    why["average"] = "one run" if average == 1 else f"{average} runs over other shuffles, weights averaged"
    # an Adam step moves each weight by about lr, so a logit by about lr * |x|_1; fix that product (README) instead
    # of lr itself, so 512-d and 25,088-d features both train
    lr = cfg.lr or AUTO_LOGIT_STEP / max(mean_l1, 1e-12)
    why["lr"] = "as asked" if cfg.lr else f"{AUTO_LOGIT_STEP:g} / mean L1 norm of a row {mean_l1:.4g}"
    dim = int(meta.get("feature_dim", 0))
    if not cfg.lr and cfg.init == "ridge" and n_rows and dim > n_rows:
        # more features than rows: the least-squares start already separates the rows, and full Adam steps drift
        # towards rare features (README, "Choosing the head's settings", has the measurement)
        lr *= n_rows / dim
        why["lr"] += f", x {n_rows:,} rows / {dim:,} features: small steps from the ridge start"
    return Chosen(dropout, average, lr, why)


def _fit_sgd(cfg: FitConfig, rows: Rows, hold: Holdout, log) -> FitResult:
    """``average`` runs of ``epochs`` each (run 0 is what a single run does), weights averaged."""
    val = hold.mask
    n_classes = len(rows.meta["classes"])
    means, mean_l1 = rows.stats(~val, n_classes)
    chosen = choose(cfg, rows.meta, mean_l1, int((~val).sum()))
    log(chosen.line())
    start = None
    if cfg.init == "ridge":
        start = ridge_start(rows, ~val, n_classes, means)
        log("Start: " + ("the ridge fit (regularised least squares)" if start else "class means (features streamed)"))
    runs = []
    for run in range(chosen.average):  # runs after the first: their epoch lines only, each named by its run
        quiet, named = (lambda s: None), (lambda s, r=run: log(f"run {r + 1}/{chosen.average}: {s}"))
        runs.append(_sgd_run(cfg, chosen, rows, hold, means, run, *((log, log) if run == 0 else (quiet, named)), start))
    weight = torch.stack([r.weight for r in runs]).mean(0)
    bias = torch.stack([r.bias for r in runs]).mean(0)
    metrics = {**runs[0].metrics, **_row_metrics(weight, bias, rows, hold)}
    metrics.update(lr=chosen.lr, dropout=chosen.dropout, average=chosen.average, chosen=chosen.why)
    if chosen.average > 1:
        log(f"Averaged {chosen.average} runs: train accuracy {metrics['train_acc']:.1%}" + (
            f", validation accuracy {metrics['val_acc']:.1%}" if "val_acc" in metrics else ""))  # fmt: skip
    return FitResult(weight, bias, metrics, [h for r in runs for h in r.history])


def _row_metrics(weight, bias, rows: Rows, hold: Holdout) -> dict:
    """Loss and accuracy of a head on the training rows (read window by window) and the validation rows."""
    loss_sum = correct = seen = 0
    head = LinearHead.of(weight, bias)
    for start in range(0, rows.n, window_rows(rows.dim)):
        idx = np.arange(start, min(start + window_rows(rows.dim), rows.n))
        idx = idx[~hold.mask[idx]]
        if len(idx):
            y = rows.labels[idx]
            loss, pred, _ = score(head, rows.take(idx), y)
            loss_sum, correct, seen = loss_sum + loss * len(y), correct + int((pred == y).sum()), seen + len(y)
    out = {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
    if len(hold.y):
        loss, pred, _ = score(head, hold.x, hold.y)
        out.update(val_loss=loss, val_acc=float((pred == hold.y).mean()))
    return out


def _sgd_run(cfg: FitConfig, chosen: Chosen, rows: Rows, hold: Holdout, means, run: int, log, say, start=None):
    """One run of ``epochs``; with a validation split, its best epoch. Run 0 draws what a single run always drew.
    ``log`` gets the running-loss lines, ``say`` each epoch's summary."""
    n_classes = len(rows.meta["classes"])
    history, best, val = [], None, hold.mask
    stream = (cfg.seed, run) if run else cfg.seed  # run k > 0: its own shuffles and masks
    with torch.random.fork_rng(devices=[]):  # seeds the random init without touching the caller's RNG
        torch.manual_seed(cfg.seed + 7919 * run)
        linear = LinearHead(rows.dim, n_classes, chosen.dropout).linear  # trained with numpy's dropout masks
        if start is not None:
            with torch.no_grad():
                linear.weight.copy_(start[0])
                linear.bias.copy_(start[1])
        elif cfg.init in ("ridge", "class-means"):
            _init_from_class_means(linear, means)
        opt, sched = _optimizer(cfg, linear, chosen.lr, _count_steps(cfg, rows, val))
        mask_rng = np.random.default_rng([*np.atleast_1d(stream), 1])
        steps = _Steps(cfg, rows, val, chosen.dropout, stream, linear, opt, sched, mask_rng, log)
        for epoch in range(1, cfg.epochs + 1):
            entry = steps.epoch(epoch)
            weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
            if len(hold.y):
                vloss, vpred, _ = score(LinearHead.of(weight, bias), hold.x, hold.y)
                entry.update(val_loss=vloss, val_acc=float((vpred == hold.y).mean()))
                if best is None or entry["val_acc"] > best[0]["val_acc"]:
                    best = (entry, weight, bias)
            history.append({**entry, "run": run})
            say(_epoch_line(entry))
    entry, weight, bias = best if best is not None else (history[-1], weight, bias)
    if len(hold.y):
        say(f"Kept epoch {entry['epoch']} (best validation accuracy {entry['val_acc']:.1%})")
    return FitResult(weight, bias, {"best_epoch": entry["epoch"]}, history)


def _count_steps(cfg: FitConfig, rows: Rows, val: np.ndarray) -> int:
    """Optimizer steps over the whole run (the cosine schedule's length)."""
    windows = epoch_windows(rows.n, rows.block, window_rows(rows.dim), cfg.seed, 1)
    return cfg.epochs * sum(math.ceil(len(w[~val[w]]) / cfg.batch_size) for w in windows)


def _optimizer(cfg: FitConfig, linear: nn.Linear, lr: float, steps: int):
    """(optimizer, scheduler or None) for the linear layer."""
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule != "cosine":
        return opt, None
    # short runs converge much closer when the step size decays to zero
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))


@dataclass
class _Steps:
    """What one run's mini-batch steps need: the rows, the layer and its optimizer, the shuffles' and masks' seeds."""

    cfg: FitConfig
    rows: Rows
    val: np.ndarray  # (N,) bool: validation rows, left out
    dropout: float
    stream: object  # seed of the shuffles: cfg.seed, or (seed, run) for averaged runs
    linear: nn.Linear
    opt: torch.optim.Optimizer
    sched: object  # an lr scheduler, or None
    mask_rng: np.random.Generator  # dropout masks
    log: Callable[[str], None]

    def epoch(self, epoch: int) -> dict:
        """One pass over the training rows in mini-batches; the textbook's running-loss lines; the epoch's figures."""
        cfg, rows = self.cfg, self.rows
        t0 = time.perf_counter()
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        labels = torch.from_numpy(rows.labels)
        running, total_loss, seen, correct, batch_i = 0.0, 0.0, 0, 0, 0
        for window in epoch_windows(rows.n, rows.block, window_rows(rows.dim), self.stream, epoch):
            window = window[~self.val[window]]
            x_win, y_win = torch.from_numpy(rows.take(window)), labels[window]
            for s in range(0, len(window), cfg.batch_size):
                x, y = x_win[s : s + cfg.batch_size], y_win[s : s + cfg.batch_size]
                self.opt.zero_grad(set_to_none=True)
                out = self.linear(_dropout(x, self.dropout, self.mask_rng))  # (B, C)
                loss = criterion(out, y)
                loss.backward()
                self.opt.step()
                if self.sched is not None:
                    self.sched.step()
                batch_i += 1
                running += loss.item()
                total_loss += loss.item() * len(y)
                seen += len(y)
                correct += int((out.argmax(1) == y).sum())
                if batch_i % cfg.log_every == 0:
                    self.log(f"Epoch {epoch}, Batch {batch_i} loss: {running / cfg.log_every:.16f}")
                    running = 0.0
        return {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "seconds": time.perf_counter() - t0,
        }


def _dropout(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """Inverted dropout, as nn.Dropout in training, with masks from numpy's PCG64: much faster than torch's
    CPU Bernoulli sampler, which dominated a step on 25,088-d pool5 rows."""
    if p == 0:
        return x
    keep = torch.from_numpy(rng.random(tuple(x.shape), dtype=np.float32) >= p)
    return x * keep * (1.0 / (1.0 - p))


RIDGE_LAMBDA = 0.3  # x mean squared norm of a centred row (README, "Choosing the head's settings")


def ridge_start(rows: Rows, mask: np.ndarray, n_classes: int, means: np.ndarray, margin: float = 4.0):
    """(weight, bias) of the ridge fit of centred one-hot labels on the ``mask`` rows, scaled so the class means get
    logit margins of about ``margin``: in primal form (D x D) when D <= N, read window by window; in dual form
    (N x N) when the features outnumber the rows and sit in memory; None otherwise (streamed and D > N)."""
    idx = np.flatnonzero(mask)
    n, dim = len(idx), rows.dim
    y = torch.nn.functional.one_hot(torch.from_numpy(rows.labels[idx]), n_classes).double()
    y -= y.mean(0)
    mu = torch.from_numpy(means.T @ np.bincount(rows.labels[idx], minlength=n_classes) / n)  # (D,) the rows' mean
    if dim <= n:
        gram, xty = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, n_classes, dtype=torch.float64)
        for start in range(0, n, window_rows(dim)):
            x = torch.from_numpy(rows.take(idx[start : start + window_rows(dim)])).double() - mu
            gram += x.T @ x
            xty += x.T @ y[start : start + len(x)]
        gram.diagonal().add_(RIDGE_LAMBDA * gram.trace() / n)
        weight = torch.linalg.solve(gram, xty).T  # (C, D)
    elif rows.data is not None:
        xc = torch.from_numpy(rows.data[idx]) - mu.float()
        k = (xc @ xc.T).double()  # (N, N)
        k.diagonal().add_(RIDGE_LAMBDA * k.trace() / n)
        weight = (torch.linalg.solve(k, y).float().T @ xc).double()  # (C, D)
    else:
        return None
    bias = -(weight @ mu)
    logits = torch.from_numpy(means) @ weight.T + bias  # (C, C): each class mean's logits
    scale = margin / max(float((logits.diagonal() - logits.mean(1)).mean()), 1e-12)
    return (weight * scale).float(), (bias * scale).float()


def _init_from_class_means(linear: nn.Linear, means: np.ndarray, margin: float = 4.0) -> None:
    """Point each class's weights along its centred mean feature ("weight imprinting"), scaled so that the
    class means get logit margins of about ``margin``; training then starts near a nearest-mean classifier."""
    centred = means - means.mean(0)
    scale = margin / max(float((centred**2).sum(1).mean()), 1e-12)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(centred * scale).float())
        linear.bias.zero_()


def _epoch_line(e: dict) -> str:
    line = f"Epoch {e['epoch']} done: train loss {e['train_loss']:.4f}, train accuracy {e['train_acc']:.1%}"
    if "val_acc" in e:
        line += f", validation loss {e['val_loss']:.4f}, validation accuracy {e['val_acc']:.1%}"
    return line + f" ({e['seconds']:.2f} s)"


def _fit_lbfgs(cfg: FitConfig, rows: Rows, hold: Holdout, log) -> FitResult:
    """Full-batch multinomial logistic regression (scikit-learn's L-BFGS) with L2 strength 1/C."""
    from sklearn.linear_model import LogisticRegression

    if rows.streamed:
        raise FlowerfeatError(
            f"{rows.name}: features exceed --max-memory {cfg.max_memory} GiB; --solver lbfgs needs them in "
            "memory (raise --max-memory or use the default --solver sgd, which streams)"
        )
    t0 = time.perf_counter()
    x, y = rows.data[~hold.mask], rows.labels[~hold.mask]
    clf = LogisticRegression(C=cfg.C, max_iter=1000, random_state=cfg.seed)
    clf.fit(x, y)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; softmax over [0, z] equals sigmoid(z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    n_classes = len(rows.meta["classes"])
    weight = torch.zeros(n_classes, rows.dim)
    bias = torch.zeros(n_classes)
    weight[clf.classes_] = torch.from_numpy(coef).float()
    bias[clf.classes_] = torch.from_numpy(intercept).float()
    loss, pred, _ = score(LinearHead.of(weight, bias), x, y)
    entry = {
        "epoch": 1,
        "train_loss": loss,
        "train_acc": float((pred == y).mean()),
        "seconds": time.perf_counter() - t0,
    }
    if len(hold.y):
        vloss, vpred, _ = score(LinearHead.of(weight, bias), hold.x, hold.y)
        entry.update(val_loss=vloss, val_acc=float((vpred == hold.y).mean()))
    log(_epoch_line(entry).replace("Epoch 1 done", f"L-BFGS done ({clf.n_iter_.max()} iterations)"))
    return FitResult(weight, bias, {"best_epoch": 1, **{k: v for k, v in entry.items() if k != "epoch"}}, [entry])
