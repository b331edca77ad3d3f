"""Cached rows for training, in memory or streamed from disk in chunk-shuffled windows (the same batches either way),
and the validation split of a training file."""

from __future__ import annotations

import math
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
    class and all views of an image go together."""
    mask = np.zeros(len(labels), bool)
    if fraction <= 0:
        return mask
    from sklearn.model_selection import StratifiedShuffleSplit

    group_of: dict = {}  # (label, path) of an image -> its group index
    groups = np.array([group_of.setdefault((y, p), len(group_of)) for y, p in zip(labels.tolist(), paths.tolist())])
    group_labels = np.array([y for y, _p in group_of])
    try:
        shuffle = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, val_groups = next(shuffle.split(np.zeros(len(group_labels)), group_labels))
    except ValueError as e:  # too few images for a stratified split of this size
        raise FlowerfeatError(f"--val-fraction {fraction}: {e}; raise it, or use 0") from None
    mask[np.isin(groups, val_groups)] = True
    return mask
