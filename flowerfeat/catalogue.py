"""What `flowerfeat models` lists: each choosable model's cuts, cost, ImageNet accuracy and offline weights; rows are
yielded as each is read, and what was read is remembered so the next listing prints at once, without loading torch."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from typing import Iterator

from flowerfeat import __version__, store

CACHE = "models.json"  # in the user's cache folder (store.user_cache)


def catalogue(pattern: str | None = None) -> Iterator[dict]:
    """One record per model whose name matches the shell ``pattern`` (every listed family's when None; a family
    listed only when asked, timm's, when the pattern starts with its prefix: ``timm:*lite*``), as each is read."""
    from flowerfeat.backbones import get_backbone, list_models
    from flowerfeat.errors import FlowerfeatError

    for name in list_models(pattern):
        backbone = get_backbone(name)
        try:
            cuts = [{"layer": c.name, "dim": c.dim, "dropout": c.dropout, "about": c.about}
                    for c in backbone.cuts().values()]  # fmt: skip
        except FlowerfeatError as e:  # listed, with why it cannot be cut (SqueezeNet's classifier is a convolution)
            yield {"model": name, "family": backbone.family, "cuts": [], "error": str(e)}
            continue
        yield {"model": name, "family": backbone.family, "cuts": cuts, **backbone.describe()}


def _versions() -> dict:
    """The versions that decide the rows, read without importing the packages."""
    found = {"flowerfeat": __version__}
    for name in ("torch", "torchvision", "timm"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _state(dirs: list[str]) -> dict:
    """Each download folder's modification time (None: not there): a download into one changes it."""
    return {d: os.stat(d).st_mtime_ns if os.path.isdir(d) else None for d in dirs}


def remembered(pattern: str | None) -> list[dict] | None:
    """The rows a listing of ``pattern`` computed before, when nothing that decides them has changed since (the
    versions; the folders the weights are downloaded to); None otherwise. Imports nothing heavy."""
    try:
        entry = json.loads(store.user_cache(CACHE).read_text())[pattern or "*"]
    except (OSError, ValueError, KeyError):
        return None
    if entry.get("versions") != _versions() or entry.get("state") != _state(list(entry.get("state", {}))):
        return None
    return entry["rows"]


def remember(pattern: str | None, rows: list[dict]) -> None:
    """Keep ``rows`` for the next listing of ``pattern`` (best effort: an unwritable cache folder changes nothing)."""
    from flowerfeat.backbones import weights_dirs

    path = store.user_cache(CACHE)
    try:
        kept = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        kept = {}
    kept[pattern or "*"] = {"versions": _versions(), "state": _state(weights_dirs()), "rows": rows}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(path, json.dumps(kept))
    except OSError:
        pass


HEADER = f"{'model':<32} {'layers (dimension; the first is the default)':<46} {'GFLOPs':>7} {'top-1':>6}  offline"


def catalogue_line(r: dict) -> str:
    """One record as a table row: model, cuts with dimensions (the default first), GFLOPs, top-1, offline."""
    if r.get("error"):
        return f"{r['model']:<32} not usable: {r['error']}"
    cuts = ", ".join(f"{c['layer']} ({c['dim']})" for c in r["cuts"])
    top1 = f"{r['imagenet_top1']:.1f}" if r.get("imagenet_top1") else "?"
    offline = {True: "yes", False: "no", None: "?"}[r.get("weights_offline")]
    return f"{r['model']:<32} {cuts:<46} {gflops_text(r.get('gflops')):>7} {top1:>6}  {offline}"


def gflops_text(g: float | None) -> str:
    return "?" if g is None or not math.isfinite(g) else f"{g:.2f}"


def footer(n: int) -> str:
    return f"{n} models; weights offline: in torch's or the Hugging Face hub cache, else pass --weights PATH"
