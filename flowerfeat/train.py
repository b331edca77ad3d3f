"""Fit the replacement layer (Dropout + Linear, VGG16's classifier[5:]) on cached features; save/load checkpoints."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from flowerfeat import store
from flowerfeat.backbone import LOAD_ERRORS
from flowerfeat.config import FitConfig
from flowerfeat.errors import FlowerfeatError

# Rows shuffled together when streaming (and, so both give the same head, in memory too): 256 MiB of features.
WINDOW_BYTES = 256 << 20
CHECKPOINT_VERSION = 1
# --lr 0 (auto) sets Adam's lr to this over the mean L1 norm of a training row: 7e-5 on flat pool5 rows.
AUTO_LOGIT_STEP = 2.7
# Feature-file attributes a head depends on; predict/report check them against the trunk or test file.
FEATURE_KEYS = (
    "layer",
    "feature_dim",
    "weights",
    "weights_sha256",
    "preprocessing",
    "decoder",
    "precision",
    "dtype",
    "model_key",
    "fingerprint",
    "classes",
    "views",
)


def make_head(dim: int, n_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """Dropout + Linear: the replacement for VGG16's classifier[5:] (classifier[6] is the Linear)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_classes))


def window_rows(dim: int) -> int:
    return max(1, WINDOW_BYTES // (dim * 4))


def epoch_windows(n: int, block: int, window: int, seed: int, epoch: int):
    """Row order of one epoch, as windows: shuffle blocks of ``block`` rows, then rows within each window.

    Depends only on (n, block, window, seed, epoch), so in-memory and streamed training see the same batches.
    When ``window >= n`` (every data set that fits the window) it is a full random permutation.
    """
    rng = np.random.default_rng([seed, epoch])
    n_blocks = math.ceil(n / block)
    blocks = rng.permutation(n_blocks)
    per_window = max(1, window // block)
    for g in range(0, n_blocks, per_window):
        rows = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in blocks[g : g + per_window]])
        rng.shuffle(rows)
        yield rows


class Rows:
    """Row access to a feature file: all in memory, or streamed block by block from HDF5 (flat memory)."""

    def __init__(self, path: Path, max_memory_gib: float):
        import h5py

        self.meta = store.read_meta(path)
        self.file = h5py.File(path, "r")
        self.ds = self.file["features"]
        self.n, self.dim = self.ds.shape
        self.labels = self.file["labels"][...]  # (N,) int64: 8 bytes a row beside 4*D of features
        self.block = self.ds.chunks[0] if self.ds.chunks else max(1, self.n)
        self.streamed = self.n * self.dim * 4 > max_memory_gib * (1 << 30)
        self.data = None if self.streamed else self.ds[...].astype(np.float32, copy=False)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Features of ``rows`` (any order) as float32; streamed reads go block by block, in file order."""
        if self.data is not None:
            return self.data[rows]
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        blocks = sorted_rows // self.block
        for b in np.unique(blocks):
            sel = blocks == b
            chunk = self.ds[b * self.block : min((b + 1) * self.block, self.n)]
            out[order[sel]] = chunk[sorted_rows[sel] - b * self.block]
        return out

    def stats(self, mask: np.ndarray, n_classes: int) -> tuple[np.ndarray, float]:
        """(C, D) mean feature per class and the mean L1 norm of a row, over the rows in ``mask``; read in file
        order, one window at a time."""
        sums, counts, l1 = np.zeros((n_classes, self.dim)), np.zeros(n_classes), 0.0
        step = max(self.block, window_rows(self.dim) // self.block * self.block)
        for start in range(0, self.n, step):
            rows = np.arange(start, min(start + step, self.n))
            rows = rows[mask[rows]]
            x, y = self.take(rows), self.labels[rows]
            l1 += float(np.abs(x).sum(dtype=np.float64))
            for c in np.unique(y):
                sums[c] += x[y == c].sum(0, dtype=np.float64)
                counts[c] += (y == c).sum()
        return sums / np.maximum(counts, 1)[:, None], l1 / max(counts.sum(), 1)

    def close(self):
        self.file.close()


@dataclass
class FitResult:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    metrics: dict
    history: list[dict] = field(default_factory=list)


def split_validation(labels: np.ndarray, paths: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: stratified by class, by image (all views of an image go together)."""
    mask = np.zeros(len(labels), bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng([seed, 7])
    images = {}
    for r, (p, y) in enumerate(zip(paths.tolist(), labels.tolist())):
        images.setdefault((y, p), []).append(r)
    by_class: dict[int, list] = {}
    for (y, p), rows in sorted(images.items()):
        by_class.setdefault(y, []).append(rows)
    for y, groups in by_class.items():
        k = int(round(len(groups) * fraction))
        for gi in rng.permutation(len(groups))[:k]:
            mask[groups[gi]] = True
    return mask


def evaluate(
    weight: torch.Tensor, bias: torch.Tensor, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean cross-entropy, predictions, probabilities) of the linear layer on features ``x``."""
    with torch.no_grad():
        logits = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) @ weight.T + bias  # (N, C)
        loss = (
            nn.functional.cross_entropy(logits, torch.from_numpy(y).long(), reduction="mean").item()
            if len(y)
            else float("nan")
        )
        probs = logits.softmax(1)
    return loss, probs.argmax(1).numpy(), probs.numpy()


def fit(cfg: FitConfig, log: Callable[[str], None] = lambda s: None) -> tuple[FitResult, dict]:
    """Train the head on ``cfg.features``; returns the result and the feature file's metadata."""
    rows = Rows(cfg.features, cfg.max_memory)
    try:
        meta = rows.meta
        if len(set(rows.labels.tolist())) < 2:
            raise FlowerfeatError(f"{cfg.features}: features hold fewer than 2 classes; a classifier needs at least 2")
        paths = rows.file["paths"][...] if cfg.val_fraction > 0 else np.array([], object)  # only to group views
        val = split_validation(rows.labels, paths, cfg.val_fraction, cfg.seed)
        if cfg.val_fraction and not val.any():
            raise FlowerfeatError(f"--val-fraction {cfg.val_fraction} leaves no validation image; raise it or use 0")
        if cfg.solver == "lbfgs":
            result = _fit_lbfgs(cfg, rows, val, log)
        else:
            result = _fit_sgd(cfg, rows, val, log)
        result.metrics.update(
            rows=int(rows.n), train_rows=int((~val).sum()), val_rows=int(val.sum()), streamed=bool(rows.streamed)
        )
        return result, meta
    finally:
        rows.close()


def _fit_sgd(cfg: FitConfig, rows: Rows, val: np.ndarray, log) -> FitResult:
    n_classes = len(rows.meta["classes"])
    history, best = [], None
    val_rows = np.flatnonzero(val)
    val_x = rows.take(val_rows) if len(val_rows) else None
    with torch.random.fork_rng(devices=[]):  # seeds the random init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        linear = make_head(rows.dim, n_classes, cfg.dropout)[1]
        means, mean_l1 = rows.stats(~val, n_classes)
        if cfg.init == "class-means":
            _init_from_class_means(linear, means)
        # Auto: an Adam step moves each weight by about lr, so a logit by about lr * |x|_1; fix that product
        # (measured best for flat pool5, README) instead of lr itself, so 512-d and 25,088-d features both train.
        lr = cfg.lr if cfg.lr else AUTO_LOGIT_STEP / max(mean_l1, 1e-12)
        auto = f" (auto: {AUTO_LOGIT_STEP:g} / mean L1 norm {mean_l1:.4g})" if not cfg.lr else ""
        log(f"Learning rate {lr:.3g}{auto}")
        opt, sched = _optimizer(cfg, linear, lr, _count_steps(cfg, rows, val))
        mask_rng = np.random.default_rng([cfg.seed, 1])
        for epoch in range(1, cfg.epochs + 1):
            entry = _train_epoch(cfg, rows, val, linear, opt, sched, mask_rng, epoch, log)
            weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
            if val_x is not None:
                vloss, vpred, _ = evaluate(weight, bias, val_x, rows.labels[val_rows])
                entry.update(val_loss=vloss, val_acc=float((vpred == rows.labels[val_rows]).mean()))
                if best is None or entry["val_acc"] > best[0]["val_acc"]:
                    best = (entry, weight, bias)
            history.append(entry)
            log(_epoch_line(entry))
    entry, weight, bias = best if best is not None else (history[-1], weight, bias)
    metrics = {"best_epoch": entry["epoch"], "lr": lr, **{k: v for k, v in entry.items() if k != "epoch"}}
    if val_x is not None:
        log(f"Kept epoch {entry['epoch']} (best validation accuracy {entry['val_acc']:.1%})")
    return FitResult(weight, bias, metrics, history)


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


def _train_epoch(cfg: FitConfig, rows: Rows, val, linear, opt, sched, mask_rng, epoch: int, log) -> dict:
    """One pass over the training rows in mini-batches; the textbook's running-loss lines; the epoch's figures."""
    t0 = time.perf_counter()
    criterion = nn.CrossEntropyLoss()
    labels = torch.from_numpy(rows.labels)
    running, total_loss, seen, correct, batch_i = 0.0, 0.0, 0, 0, 0
    for window in epoch_windows(rows.n, rows.block, window_rows(rows.dim), cfg.seed, epoch):
        window = window[~val[window]]
        x_win, y_win = torch.from_numpy(rows.take(window)), labels[window]
        for s in range(0, len(window), cfg.batch_size):
            x, y = x_win[s : s + cfg.batch_size], y_win[s : s + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            out = linear(_dropout(x, cfg.dropout, mask_rng))  # (B, C)
            loss = criterion(out, y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            batch_i += 1
            running += loss.item()
            total_loss += loss.item() * len(y)
            seen += len(y)
            correct += int((out.argmax(1) == y).sum())
            if batch_i % cfg.log_every == 0:
                log(f"Epoch {epoch}, Batch {batch_i} loss: {running / cfg.log_every:.16f}")
                running = 0.0
    return {
        "epoch": epoch,
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "seconds": time.perf_counter() - t0,
    }


def _dropout(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """Inverted dropout, as nn.Dropout in training, with masks from numpy's PCG64: about 10x faster than torch's
    CPU Bernoulli sampler, which dominated a step on 25,088-d pool5 rows."""
    if p == 0:
        return x
    keep = torch.from_numpy(rng.random(tuple(x.shape), dtype=np.float32) >= p)
    return x * keep * (1.0 / (1.0 - p))


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


def _fit_lbfgs(cfg: FitConfig, rows: Rows, val: np.ndarray, log) -> FitResult:
    """Full-batch multinomial logistic regression (scikit-learn's L-BFGS) with L2 strength 1/C."""
    from sklearn.linear_model import LogisticRegression

    if rows.streamed:
        raise FlowerfeatError(
            f"{rows.file.filename}: features exceed --max-memory {cfg.max_memory} GiB; --solver lbfgs needs them in "
            "memory (raise --max-memory or use the default --solver sgd, which streams)"
        )
    t0 = time.perf_counter()
    x, y = rows.data[~val], rows.labels[~val]
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
    loss, pred, _ = evaluate(weight, bias, x, y)
    entry = {
        "epoch": 1,
        "train_loss": loss,
        "train_acc": float((pred == y).mean()),
        "seconds": time.perf_counter() - t0,
    }
    if val.any():
        vloss, vpred, _ = evaluate(weight, bias, rows.data[val], rows.labels[val])
        entry.update(val_loss=vloss, val_acc=float((vpred == rows.labels[val]).mean()))
    log(_epoch_line(entry).replace("Epoch 1 done", f"L-BFGS done ({clf.n_iter_.max()} iterations)"))
    return FitResult(weight, bias, {"best_epoch": 1, **{k: v for k, v in entry.items() if k != "epoch"}}, [entry])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: tensors + one JSON string, read back with torch.load(weights_only=True): no code runs on load.


def save_checkpoint(path: Path, result: FitResult, feature_meta: dict, cfg: FitConfig) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "features": {k: feature_meta[k] for k in FEATURE_KEYS},
        "num_classes": len(feature_meta["classes"]),
        "config": cfg.to_dict(),
        "metrics": result.metrics,
        "history": result.history,
    }
    with store.atomic_path(path) as tmp:
        torch.save(
            {"weight": result.weight.contiguous(), "bias": result.bias.contiguous(), "meta": json.dumps(meta)}, tmp
        )


@dataclass
class Checkpoint:
    weight: torch.Tensor
    bias: torch.Tensor
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["features"]["classes"])


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        raise FlowerfeatError(f"{path}: is a directory; pass the checkpoint file, e.g. --head {path / 'head.pt'}")
    if not path.is_file():
        raise FlowerfeatError(f"{path}: head checkpoint not found; run `flowerfeat fit-head` first (or pass --head)")
    refusal = FlowerfeatError(
        f"{path}: not a flowerfeat head checkpoint (corrupt, truncated or foreign); rerun `flowerfeat fit-head`"
    )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        ck = Checkpoint(blob["weight"], blob["bias"], meta)
        shape = (meta["num_classes"], meta["features"]["feature_dim"])
    except (*LOAD_ERRORS, KeyError, TypeError, IndexError):  # not torch's format, or not ours
        raise refusal from None
    if meta.get("checkpoint_version") != CHECKPOINT_VERSION or tuple(ck.weight.shape) != shape:
        raise refusal
    return ck


def check_compatible(ck: Checkpoint, feature_meta: dict, features_path: Path, head_path: Path) -> None:
    """Refuse a head and a feature file that were not made by the same trunk, layer, preprocessing and classes."""
    own = ck.meta["features"]
    named = ("layer", "feature_dim", "weights", "preprocessing", "decoder", "precision", "dtype", "classes")
    diffs = [k for k in named if own.get(k) != feature_meta.get(k)]
    if not diffs and own["model_key"] != feature_meta["model_key"]:
        diffs = ["model_key"]
    if diffs:
        what = ", ".join(f"{k} {str(own.get(k))[:50]} vs {str(feature_meta.get(k))[:50]}" for k in diffs[:3])
        raise FlowerfeatError(
            f"{features_path}: features do not match head {head_path} ({what}); extract them with the head's "
            "settings or refit the head on features from the same run"
        )
