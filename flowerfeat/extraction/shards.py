"""torchrun's ranks and their shards: each rank appends its finished batches to its own shard log (store.ShardLog);
when all are done, rank 0 merges the reused rows and every shard, in unit order, into the finished file."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from flowerfeat import store
from flowerfeat.data import Split


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def dist_from_env() -> tuple[Dist, Callable[[], None]]:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPUs); else a single-rank Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), lambda: None
    import torch.distributed as td

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend)
    return Dist(td.get_rank(), td.get_world_size(), td.barrier), td.destroy_process_group


def shard_header(meta: dict, batch_size: int, todo: int, dist: Dist) -> dict:
    """What a shard log must match to be resumed: the same work, cut the same way, for the same rank."""
    return {
        "fingerprint": meta["fingerprint"],
        "feature_dim": meta["feature_dim"],
        "dtype": meta["dtype"],
        "batch_size": batch_size,
        "todo": todo,
        "world": dist.world,
        "rank": dist.rank,
    }


def open_shard(final: Path, header: dict) -> store.ShardLog:
    return store.ShardLog(store.shard_dir(final, header["rank"], header["world"]), header)


class _Source(NamedTuple):
    """Where one finished row comes from: row ``row`` of shard ``shard``, or of the previous file (shard None)."""

    shard: int | None
    row: int


def merge(final: Path, previous: Path | None, meta: dict, split: Split, reuse: dict, header: dict):
    """Merge rows reused from ``previous`` and every rank's shard into the finished file, in unit order, with flat
    memory; returns (skipped images, rows)."""
    nv = 1 + meta["views"]
    sources = {u: _Source(None, r) for u, r in reuse.items()}
    shards, skipped_units = [], {}
    for rank in range(header["world"]):
        log = open_shard(final, {**header, "rank": rank})
        rows, ids, skipped = log.read()
        log.close()
        shards.append(rows)
        sources.update((u, _Source(rank, i)) for i, u in enumerate(ids.tolist()))
        for u, why in skipped:
            skipped_units.setdefault(u // nv, why)
    order = sorted(sources)
    items = [split.items[u // nv] for u in order]
    columns = {
        "labels": [it.label for it in items],
        "paths": [it.relpath for it in items],
        "views": [u % nv for u in order],
        "file_sizes": [it.size for it in items],
        "file_mtimes_ns": [it.mtime_ns for it in items],
    }
    skipped = [
        (split.items[i].relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), why)
        for i, why in sorted(skipped_units.items())
    ]
    old = store.FeatureReader(previous) if reuse else None
    try:
        meta = {**meta, "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        blocks = _row_blocks([sources[u] for u in order], shards, old, meta)
        store.write_feature_file(final, meta, len(order), blocks, columns, skipped)
    finally:
        if old is not None:
            old.close()
    return skipped, len(order)


def _row_blocks(sources: list[_Source], shards: list[np.ndarray], old, meta: dict, step: int = 1024):
    """Blocks of finished rows in order, (start, rows), each gathered with one fancy read per source."""
    dtype = np.dtype(meta["dtype"])
    for start in range(0, len(sources), step):
        part = sources[start : start + step]
        block = np.empty((len(part), meta["feature_dim"]), dtype)
        by_shard: dict[int | None, list[tuple[int, int]]] = {}  # shard -> [(position in block, row)]
        for k, s in enumerate(part):
            by_shard.setdefault(s.shard, []).append((k, s.row))
        for shard, pairs in by_shard.items():
            at, rows = (np.array(v, dtype=np.int64) for v in zip(*pairs))
            block[at] = old.take(rows) if shard is None else shards[shard][rows]  # None: the previous file's rows
        yield start, block
