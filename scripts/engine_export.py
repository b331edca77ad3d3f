"""What preparing the onnxruntime engine costs, by exporter (docs/benchmarks.md, "Preparing an engine"): for each
model, the seconds to export its trunk with torch.onnx's TorchScript exporter (what flowerfeat runs, after the
family fixes its shapes, ``Backbone.for_tracing``), the same without that fix, and torch.export's exporter; the
graph's node count, onnxruntime's images/s on one random batch (best of five) and the largest difference to torch.
Random weights: speed and agreement do not depend on them.

    python scripts/engine_export.py timm:tf_efficientnet_lite0 vgg16@pool5 resnet50
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import torch

from flowerfeat import runtime
from flowerfeat.backbones import get_backbone, parse_choice


def dynamo_export(trunk, shape, path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trunk, (torch.zeros(2, *shape),), str(path), dynamo=True, input_names=["x"],
                          output_names=["rows"], dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}},
                          external_data=False)  # fmt: skip


def measure(name: str, export, trunk, shape, batch: int, path: Path) -> str:
    import onnx

    t = time.perf_counter()
    export(trunk, shape, path)
    seconds = time.perf_counter() - t
    nodes = len(onnx.load(path).graph.node)
    model, x = runtime.OnnxModel(path), torch.randn(batch, *shape)
    with torch.no_grad():
        diff = (model(x) - trunk(x)).abs().max().item()
    best = min(_timed(model, x) for _ in range(5))
    return f"{name}: export {seconds:.2f} s, {nodes} nodes, {batch / best:.1f} images/s, max |diff| {diff:.1e}"


def _timed(model, x) -> float:
    t = time.perf_counter()
    model(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="MODEL or MODEL@CUT")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    for choice in a.models:
        model, cut = parse_choice(choice)
        backbone = get_backbone(model)
        weights = backbone.resolve_weights("none")
        trunk = backbone.build(weights, cut or backbone.default_cut)
        shape = backbone.preprocessing(weights).input_shape
        fixed = backbone.for_tracing(trunk, shape)
        ways = {"traced, shapes fixed (flowerfeat)": (runtime.export_onnx, fixed)}
        ways["torch.export"] = (dynamo_export, trunk)
        if fixed is not trunk:
            ways["traced as it is"] = (runtime.export_onnx, trunk)
        with tempfile.TemporaryDirectory() as tmp:
            for k, (way, (export, t)) in enumerate(ways.items()):
                print(f"{choice}, {measure(way, export, t, shape, a.batch, Path(tmp) / f'{k}.onnx')}", flush=True)


if __name__ == "__main__":
    main()
