"""int8 variants of one trunk side by side on this CPU, for choosing quantize.py's settings per CPU kind: the trunk
alone (onnxruntime, flowerfeat's session settings, batch 16 of real preprocessed photos, best of 5) for fp32 and for
each way of quantizing it, with the rows' cosine to fp32 on test photos. Every variant is calibrated on the sample
`features --precision int8` takes (quantize.calibration_sample); the first is what it does on this CPU.

    python scripts/int8_variants.py ../shared/data/flower_photos --model timm:tf_efficientnet_lite0 \
        --weights ../shared/weights/tf_efficientnet_lite0_imagenet.pth

Random weights (--weights none) time the same but their cosines mean little.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowerfeat import quantize, runtime
from flowerfeat.config import ExtractConfig
from flowerfeat.layouts import scan_data
from flowerfeat.recipe import resolve, traced_trunk


def depthwise_convs(model: Path) -> list[str]:
    """The names of the graph's grouped (depthwise) convolutions."""
    import onnx

    graph = onnx.load(str(model)).graph
    grouped = []
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            grouped.append(node.name)
    return grouped


def variants(model: Path, settings: quantize.Settings) -> dict[str, dict]:
    """Each variant's keyword arguments to onnxruntime's quantize_static; the first is flowerfeat's own."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    base = quantize.static_options(settings)
    return {
        "QDQ, per-channel s8 weights (flowerfeat)": base,
        "QOperator": {**base, "quant_format": QuantFormat.QOperator},
        "depthwise convolutions in fp32": {**base, "nodes_to_exclude": depthwise_convs(model)},
        "per-tensor weights": {**base, "per_channel": False},
        "s8 activations (onnxruntime's default)": {**base, "activation_type": QuantType.QInt8},
        "u8 weights, full range (no saturation on AVX2)": {**base, "weight_type": QuantType.QUInt8,
                                                           "reduce_range": False},
        "percentile calibration (99.999 %)": {**base, "calibrate_method": CalibrationMethod.Percentile},
    }  # fmt: skip


def rows(model, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([model.session.run(None, {"x": images[i : i + batch]})[0]
                           for i in range(0, len(images), batch)])  # fmt: skip


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Prints one line per variant; returns them as {name: {images_per_s, over_fp32, cosine_min, cosine_median,
    quantize_s}}."""
    from onnxruntime.quantization import quant_pre_process, quantize_static

    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path, help="a folder with train/ and test/ class folders")
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--layer", default=None, help="the model's cut (default: its first)")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--calibration", type=int, default=256, help="training photos that calibrate (flowerfeat: 256)")
    ap.add_argument("--test", type=int, default=128, help="test photos the cosines are taken on")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto", help="auto: as this CPU's")
    a = ap.parse_args(argv)
    trunk, pre = built(a.model, a.layer, a.weights)
    calib, test = samples(a.data, pre, a.calibration, a.test)
    settings = quantize.settings_for_this_cpu(a.calibration, 0)
    if a.reduce_range != "auto":
        settings = dataclasses.replace(settings, reduce_range=a.reduce_range == "on")
    print(f"{a.model} ({a.weights}) on {runtime.cpu_name()}, {torch.get_num_threads()} threads; calibration "
          f"{len(calib)} photos, cosines on {len(test)} test photos; reduce_range {settings.reduce_range}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre_model = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        runtime.export_onnx(trunk, pre.input_shape, fp32)
        quant_pre_process(str(fp32), str(pre_model))
        base = runtime.OnnxModel(fp32)
        speed0, rows0 = quantize.images_per_s(base.session, test[: a.batch], rounds=5), rows(base, test, a.batch)
        print(f"fp32: {speed0:.1f} images/s", flush=True)
        for k, (name, kw) in enumerate(variants(pre_model, settings).items()):
            out = Path(tmp) / f"v{k}.onnx"
            t = time.perf_counter()
            quantize_static(str(pre_model), str(out), quantize.calibration_reader(calib, a.batch), **kw)
            made = time.perf_counter() - t
            int8 = runtime.OnnxModel(out)
            speed = quantize.images_per_s(int8.session, test[: a.batch], rounds=5)
            c = cosines(rows0, rows(int8, test, a.batch))
            results[name] = {"images_per_s": speed, "over_fp32": speed / speed0, "cosine_min": float(c.min()),
                             "cosine_median": float(np.median(c)), "quantize_s": made}  # fmt: skip
            print(f"{name}: {speed:.1f} images/s ({speed / speed0:.2f}x fp32), cosine to fp32 min {c.min():.4f} "
                  f"median {np.median(c):.4f}; quantized in {made:.1f} s", flush=True)  # fmt: skip
    return results


def built(model: str, layer: str | None, weights: str):
    """The traceable trunk of ``model`` cut at ``layer`` and its preprocessing, as the recipe resolves them."""
    recipe = resolve(ExtractConfig(model=model, layer=layer, weights=weights, precision="fp32"), torch.device("cpu"))
    return traced_trunk(recipe), recipe.preprocessing


def samples(data: Path, pre, calibration: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    """The calibration images `features --precision int8` takes from ``data``'s training split (its seeded stratified
    sample) and as many of its test split the same way, preprocessed: (N, 3, H, W) each."""
    splits = scan_data(data, ("train", "test"))
    return (quantize.calibration_sample(splits["train"], pre, calibration, 0)[0],
            quantize.calibration_sample(splits["test"], pre, test, 0)[0])  # fmt: skip


if __name__ == "__main__":
    main()
