"""Work in progress: a crash-safe append log of finished batches, one per (split, torchrun rank).

``progress.json`` is replaced atomically only after the bytes it counts are fsynced; on reopen the data files are
truncated back to it, so whatever was cut mid-write is dropped and redone, and a killed run resumes from its last
committed batch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from flowerfeat.store.layout import write_text


class ShardLog:
    """Append-only log of finished batches for one (split, rank): rows, unit ids and skipped units."""

    def __init__(self, folder: Path, header: dict):
        self.folder = folder
        self.header = header
        self.dim = int(header["feature_dim"])
        self.dtype = np.dtype(header["dtype"])
        self.discarded = ""
        head_path = folder / "header.json"
        if folder.exists():
            try:
                old = json.loads(head_path.read_text())
                progress = json.loads((folder / "progress.json").read_text())
            except (OSError, ValueError):
                old, progress = None, None
            if old != header:
                self.discarded = "partial work from another configuration" if old else "unreadable partial work"
                shutil.rmtree(folder)
            else:
                self.batches, self.rows, self.n_skipped = progress["batches"], progress["rows"], progress["skipped"]
                self._truncate()
        if not folder.exists():
            folder.mkdir(parents=True)
            self.batches = self.rows = self.n_skipped = 0
            for name in ("rows.bin", "ids.bin", "skipped.jsonl"):
                (folder / name).touch()
            write_text(head_path, json.dumps(header))
            self._write_progress()
        self._rows_f = open(folder / "rows.bin", "ab")
        self._ids_f = open(folder / "ids.bin", "ab")
        self._skip_f = open(folder / "skipped.jsonl", "a")
        self._new = [0, 0, 0]  # batches, rows, skipped appended since the last commit
        self._last_commit = time.monotonic()

    def _truncate(self) -> None:
        row_bytes = self.dim * self.dtype.itemsize
        os.truncate(self.folder / "rows.bin", self.rows * row_bytes)
        os.truncate(self.folder / "ids.bin", self.rows * 8)
        lines = (self.folder / "skipped.jsonl").read_text().splitlines(keepends=True)[: self.n_skipped]
        (self.folder / "skipped.jsonl").write_text("".join(lines))

    def _write_progress(self) -> None:
        write_text(
            self.folder / "progress.json",
            json.dumps({"batches": self.batches, "rows": self.rows, "skipped": self.n_skipped}),
        )

    def append(self, rows: np.ndarray | None, ids: list[int], skipped, commit_every_s: float = 1.0):
        """Append one finished batch (``rows`` None: none of its images was readable); it counts as done once
        committed (at most ``commit_every_s`` later)."""
        if rows is None:
            rows = np.zeros((0, self.dim), self.dtype)
        if rows.shape != (len(ids), self.dim):
            raise ValueError(f"rows of shape {rows.shape} for {len(ids)} units of {self.dim} features")
        self._rows_f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self._ids_f.write(np.asarray(ids, dtype=np.int64).tobytes())
        for unit, reason in skipped:
            self._skip_f.write(json.dumps([unit, reason]) + "\n")
        self._new = [self._new[0] + 1, self._new[1] + len(ids), self._new[2] + len(skipped)]
        if time.monotonic() - self._last_commit >= commit_every_s:
            self.commit()

    def commit(self) -> None:
        """fsync the appended bytes, then atomically advance progress.json past them."""
        if not self._new[0]:  # no batch appended since the last commit
            return
        for f in (self._rows_f, self._ids_f, self._skip_f):
            f.flush()
            os.fsync(f.fileno())
        self.batches += self._new[0]
        self.rows += self._new[1]
        self.n_skipped += self._new[2]
        self._new = [0, 0, 0]
        self._write_progress()
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what was appended (a failure, e.g. a full disk, is raised: those batches are not saved)."""
        try:
            self.commit()
        finally:
            for f in (self._rows_f, self._ids_f, self._skip_f):
                f.close()

    def read(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """Committed (rows memmap, unit ids, skipped) of this shard."""
        ids = np.fromfile(self.folder / "ids.bin", dtype=np.int64, count=self.rows)
        if self.rows:
            rows = np.memmap(self.folder / "rows.bin", dtype=self.dtype, mode="r", shape=(self.rows, self.dim))
        else:
            rows = np.zeros((0, self.dim), self.dtype)
        lines = (self.folder / "skipped.jsonl").read_text().splitlines()[: self.n_skipped]
        return rows, ids, [tuple(json.loads(line)) for line in lines]
