"""Cached rows for training, in memory or streamed from disk in chunk-shuffled windows (the same batches either way),
and the validation split of a training file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerfeat import store
from flowerfeat.errors import FlowerfeatError

# Rows shuffled together when streaming (and, so both give the same head, in memory too): 256 MiB of features.
WINDOW_BYTES = 256 << 20


def window_rows(dim: int) -> int:
    return max(1, WINDOW_BYTES // (dim * 4))


def epoch_windows(n: int, block: int, window: int, seed, epoch: int):
    """Row order of one epoch, as windows: shuffle blocks of ``block`` rows, then rows within each window.

    Depends only on (n, block, window, seed, epoch), so in-memory and streamed training see the same batches.
    When ``window >= n`` (every data set that fits the window) it is a full random permutation.
    """
    rng = np.random.default_rng([*np.atleast_1d(seed), epoch])  # seed: an int, or (seed, run) for averaged runs
    n_blocks = math.ceil(n / block)
    blocks = rng.permutation(n_blocks)
    per_window = max(1, window // block)
    for g in range(0, n_blocks, per_window):
        rows = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in blocks[g : g + per_window]])
        rng.shuffle(rows)
        yield rows


class Rows:
    """Row access to training features: a file read whole or streamed block by block from HDF5 (flat memory), or
    features already in memory. Blocks follow the file's HDF5 chunks, so both give the same batches."""

    def __init__(self, source: Path | store.Features, max_memory_gib: float):
        self.file = None
        if isinstance(source, store.Features):
            self.meta, self.name, self.data, self.labels = (
                source.meta,
                str(source.path or "features"),
                source.X,
                source.y,
            )
            self.n, self.dim = source.X.shape
            # the chunk rows the file has (or would have), so in-memory features train exactly as the file does
            itemsize = np.dtype(self.meta.get("dtype", "float32")).itemsize
            self.block, self.streamed = min(max(self.n, 1), store.chunk_rows(self.dim, itemsize)), False
            self._paths = np.array(source.paths, dtype=object)
            return
        self.file = store.FeatureReader(source)
        self.meta, self.name, self.labels = self.file.meta, str(source), self.file.labels
        self.n, self.dim, self.block = self.file.n, self.file.dim, self.file.block
        self.streamed = self.n * self.dim * 4 > max_memory_gib * (1 << 30)
        self.data = None if self.streamed else self.file.all()
        self._paths = None

    def paths(self) -> np.ndarray:
        """Each row's image path (views of one image share it)."""
        return self._paths if self._paths is not None else self.file.paths()

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
            chunk = self.file.rows(b * self.block, min((b + 1) * self.block, self.n))
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
            onehot = np.eye(n_classes, dtype=np.float32)[y]  # (B, C): per-class sums as one matmul
            sums += onehot.T @ x
            counts += onehot.sum(0)
        return sums / np.maximum(counts, 1)[:, None], l1 / max(counts.sum(), 1)

    def close(self):
        if self.file is not None:
            self.file.close()


def split_validation(labels: np.ndarray, paths: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: scikit-learn's StratifiedShuffleSplit over images, so it is stratified by
    class and all views of an image go together. What it cannot split is refused in words of the option."""
    mask = np.zeros(len(labels), bool)
    if fraction <= 0:
        return mask
    from sklearn.model_selection import StratifiedShuffleSplit

    group_of: dict = {}  # (label, path) of an image -> its group index
    groups = np.array([group_of.setdefault((y, p), len(group_of)) for y, p in zip(labels.tolist(), paths.tolist())])
    group_labels = np.array([y for y, _p in group_of])
    _check_fraction(group_labels, fraction)
    try:
        shuffle = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, val_groups = next(shuffle.split(np.zeros(len(group_labels)), group_labels))
    except ValueError:  # what the checks above do not foresee; scikit-learn's words name a class index
        raise FlowerfeatError(f"--val-fraction {fraction}: the training images cannot be split so; use 0") from None
    mask[np.isin(groups, val_groups)] = True
    return mask


def _check_fraction(image_labels: np.ndarray, fraction: float) -> None:
    n, counts = len(image_labels), np.bincount(image_labels)
    counts = counts[counts > 0]
    held = math.ceil(fraction * n)
    if held < len(counts) or n - held < len(counts):
        need = len(counts) / n
        raise FlowerfeatError(
            f"--val-fraction {fraction} holds out {held} of {n} training images; a stratified split needs at least "
            f"one image of each of the {len(counts)} classes on each side: use {math.ceil(need * 100) / 100:g} to "
            f"{1 - need:.2f}, or 0"
        )
    if counts.min() < 2:
        raise FlowerfeatError(
            f"--val-fraction {fraction}: a class has a single training image, which cannot be on both sides of a "
            "stratified split; add images or use 0"
        )


@dataclass
class Holdout:
    """The images that choose the epoch: held out of the training file (``mask``, --val-fraction) or a validation
    split's own file (mask all False); ``x``, ``y`` their rows (centre crops), ``source`` says which, in words."""

    mask: np.ndarray  # (N,) bool: training rows held out
    x: np.ndarray  # (V, D) float32
    y: np.ndarray  # (V,) int64
    source: str = ""


def holdout(rows: Rows, cfg, validation: Path | store.Features | None = None) -> Holdout:
    """The validation rows of a fit: --val-fraction of the training images when asked, else ``validation`` (the
    data set's validation split), else none."""
    if cfg.val_fraction > 0:
        mask = split_validation(rows.labels, rows.paths(), cfg.val_fraction, cfg.seed)
        idx = np.flatnonzero(mask)
        return Holdout(mask, rows.take(idx), rows.labels[idx], f"--val-fraction {cfg.val_fraction:g} of the training "
                       f"images ({len(idx)} rows)")  # fmt: skip
    none = np.zeros(rows.n, bool)
    if validation is None:
        return Holdout(none, np.zeros((0, rows.dim), np.float32), np.zeros(0, np.int64))
    val = validation if isinstance(validation, store.Features) else store.load_features(validation)
    for key in ("model_key", "classes"):
        if val.meta.get(key) != rows.meta.get(key):
            raise FlowerfeatError(
                f"{val.path}: the validation features' {key} differs from the training features' ({rows.name}); "
                "extract both in one `flowerfeat features` run"
            )
    centre = val.views == 0
    return Holdout(none, val.X[centre], val.y[centre], f"{val.path} ({int(centre.sum())} images)")
