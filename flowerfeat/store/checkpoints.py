"""Head checkpoints on disk: tensors and one JSON record, written atomically, read with ``weights_only=True`` (no
code runs on load)."""

from __future__ import annotations

import json
from pathlib import Path

from flowerfeat.errors import FlowerfeatError
from flowerfeat.store.layout import HEADS, atomic_path
from flowerfeat.weights import LOAD_ERRORS


def save_checkpoint(path: Path, tensors: dict, meta: dict) -> Path:
    """``tensors`` (name -> tensor) and ``meta`` into ``path``, atomically; its folder is made."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({**{k: v.contiguous() for k, v in tensors.items()}, "meta": json.dumps(meta)}, tmp)
    return path


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint; one-line FlowerfeatError for a missing, foreign or corrupt file."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise FlowerfeatError(f"{path}: is a directory; pass a checkpoint file, e.g. --head {path / HEADS / 'NAME.pt'}")
    if not path.is_file():
        raise FlowerfeatError(f"{path}: head checkpoint not found; run `flowerfeat fit-head` first (or pass --head)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob.pop("meta"))
        if not isinstance(meta, dict):
            raise TypeError("not a record")
    except (*LOAD_ERRORS, KeyError, TypeError, AttributeError, ValueError):  # not torch's format, or not ours
        raise FlowerfeatError(
            f"{path}: not a flowerfeat head checkpoint (corrupt, truncated or foreign); rerun `flowerfeat fit-head`"
        ) from None
    return blob, meta


def read_checkpoint_meta(path: Path) -> dict:
    """The record of a checkpoint (what it was fitted on, how), without building anything."""
    return load_checkpoint(path)[1]
