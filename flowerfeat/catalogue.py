"""What `flowerfeat models` lists: each choosable model's cuts, cost, ImageNet accuracy and offline weights."""

from __future__ import annotations

from typing import Iterator

from flowerfeat.backbones import get_backbone, gflops_text, list_models
from flowerfeat.errors import FlowerfeatError


def catalogue(pattern: str | None = None) -> Iterator[dict]:
    """One record per model whose name matches the shell ``pattern`` (every listed family's when None; a family
    listed only when asked, timm's, when the pattern starts with its prefix: ``timm:*lite*``), as each is read."""
    for name in list_models(pattern):
        backbone = get_backbone(name)
        try:
            cuts = [{"layer": c.name, "dim": c.dim, "dropout": c.dropout, "about": c.about}
                    for c in backbone.cuts().values()]  # fmt: skip
        except FlowerfeatError as e:  # listed, with why it cannot be cut (SqueezeNet's classifier is a convolution)
            yield {"model": name, "family": backbone.family, "cuts": [], "error": str(e)}
            continue
        yield {"model": name, "family": backbone.family, "cuts": cuts, **backbone.describe()}


HEADER = f"{'model':<32} {'layers (dimension; the first is the default)':<46} {'GFLOPs':>7} {'top-1':>6}  offline"


def catalogue_line(r: dict) -> str:
    """One record as a table row: model, cuts with dimensions (the default first), GFLOPs, top-1, offline."""
    if r.get("error"):
        return f"{r['model']:<32} not usable: {r['error']}"
    cuts = ", ".join(f"{c['layer']} ({c['dim']})" for c in r["cuts"])
    top1 = f"{r['imagenet_top1']:.1f}" if r.get("imagenet_top1") else "?"
    offline = {True: "yes", False: "no", None: "?"}[r.get("weights_offline")]
    return f"{r['model']:<32} {cuts:<46} {gflops_text(r.get('gflops')):>7} {top1:>6}  {offline}"


def footer(n: int) -> str:
    return f"{n} models; weights offline: in torch's or the Hugging Face hub cache, else pass --weights PATH"
