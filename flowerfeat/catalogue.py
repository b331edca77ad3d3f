"""What `flowerfeat models` lists: each choosable model's cuts, cost, ImageNet accuracy and offline weights."""

from __future__ import annotations

import fnmatch

from flowerfeat.backbones import get_backbone, gflops_text, list_models
from flowerfeat.errors import FlowerfeatError


def catalogue(pattern: str | None = None, timm: bool = False) -> list[dict]:
    """One record per model (vgg16 and torchvision's zoo, or timm's with ``timm``) whose name matches ``pattern``."""
    names = list_models("timm:" if timm else "")
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n.removeprefix("timm:"), pattern) or fnmatch.fnmatch(n, pattern)]
    rows = []
    for name in names:
        backbone = get_backbone(name)
        try:
            cuts = [
                {"layer": c.name, "dim": c.dim, "dropout": c.dropout, "about": c.about} for c in backbone.cuts().values()
            ]
        except FlowerfeatError as e:  # listed, with why it cannot be cut (SqueezeNet's classifier is a convolution)
            rows.append({"model": name, "family": backbone.family, "cuts": [], "error": str(e)})
            continue
        rows.append({"model": name, "family": backbone.family, "cuts": cuts, **backbone.describe()})
    return rows


def catalogue_lines(rows: list[dict]) -> list[str]:
    """The records as a table: model, cuts with dimensions (the default first), GFLOPs, top-1, offline."""
    lines = [f"{'model':<32} {'layers (dimension; the first is the default)':<46} {'GFLOPs':>7} {'top-1':>6}  offline"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']:<32} not usable: {r['error']}")
            continue
        cuts = ", ".join(f"{c['layer']} ({c['dim']})" for c in r["cuts"])
        top1 = f"{r['imagenet_top1']:.1f}" if r.get("imagenet_top1") else "?"
        offline = {True: "yes", False: "no", None: "?"}[r.get("weights_offline")]
        lines.append(f"{r['model']:<32} {cuts:<46} {gflops_text(r.get('gflops')):>7} {top1:>6}  {offline}")
    lines.append(f"{len(rows)} models; weights offline: in torch's or the Hugging Face hub cache, else pass --weights PATH")
    return lines
