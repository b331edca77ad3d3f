"""int8 trunks for the CPU: ONNX Runtime's static quantization, calibrated once per cache on a seeded sample of the
run's own training images, and kept beside the features (where the store says) so resumed runs, later images and
predict use the very same model."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from flowerfeat.errors import FlowerfeatError
from flowerfeat.runtime import cpu_flags, export_onnx


@dataclass(frozen=True)
class Settings:
    """How the trunk is quantized (recorded in every feature file and head, and part of the cache key)."""

    activations: str  # "uint8": what ONNX Runtime's x86 kernels take best (docs/benchmarks.md)
    weights: str  # "int8", per output channel
    reduce_range: bool  # 7-bit weights: needed where there is no VNNI, whose absence makes 8-bit products saturate
    method: str  # calibration: minmax (the default), entropy or percentile over the sample
    preprocess: bool  # ONNX Runtime's quant_pre_process (shape inference, graph optimisation) before quantizing
    calibration: int  # images in the calibration sample
    seed: int  # of the sample
    onnxruntime: str  # the version that quantized it

    def to_dict(self) -> dict:
        return asdict(self)


def settings_for_this_cpu(calibration: int, seed: int) -> Settings:
    """The settings that follow the CPU: without VNNI (AVX2 only), u8 activations with reduce_range (s8 activations
    saturate there, as ONNX Runtime documents); with VNNI (AVX512-VNNI, AVX-VNNI or AMX) the full 8-bit range."""
    import onnxruntime

    vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo's, as for bf16
    return Settings("uint8", "int8", not vnni, "minmax", True, calibration, seed, onnxruntime.__version__)


def calibration_reader(images: np.ndarray, batch: int):
    """ONNX Runtime's calibration reader over ``images`` (N, 3, H, W) in batches; ``set_range`` lets it take them a
    stride at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.starts = range(0, len(images), batch)
            self.left = iter(self.starts)

        def __len__(self) -> int:
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.left = iter(self.starts[start_index:end_index])

        def get_next(self):
            start = next(self.left, None)
            return None if start is None else {"x": np.ascontiguousarray(images[start : start + batch], np.float32)}

    return Batches()


def static_options(settings: Settings) -> dict:
    """ONNX Runtime's ``quantize_static`` keyword arguments for ``settings``: QDQ, per-channel weights."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}
    methods["percentile"] = CalibrationMethod.Percentile
    return {
        "quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": settings.reduce_range,
        "activation_type": types[settings.activations], "weight_type": types[settings.weights],
        "calibrate_method": methods[settings.method],
        # one batch at a time, each batch's ranges merged into the running min/max: the same result in flat memory
        # (collecting every batch's activations first grows with the sample: gigabytes for VGG16)
        "extra_options": {"CalibStridedMinMax": 1},
    }  # fmt: skip


def quantize(trunk: nn.Module, input_shape, images: np.ndarray, settings: Settings, out: Path, batch: int = 16) -> dict:
    """Quantize ``trunk`` statically (QDQ, per-channel int8 weights) calibrated on ``images`` (N, 3, H, W), to
    ``out`` (written under a temporary name, then renamed); returns the two graphs' speeds on this CPU
    (``measured_speed``)."""
    from onnxruntime.quantization import quant_pre_process, quantize_static

    from flowerfeat.store import atomic_path

    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as target:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(trunk, input_shape, fp32)
        if settings.preprocess:
            quant_pre_process(str(fp32), str(Path(tmp) / "pre.onnx"))
            fp32 = Path(tmp) / "pre.onnx"
        quantize_static(str(fp32), str(target), calibration_reader(images, batch), **static_options(settings))
        return measured_speed(target, fp32, images[:batch])


def measured_speed(int8: Path, fp32: Path, x: np.ndarray, rounds: int = 2) -> dict:
    """Images/s of the int8 and the fp32 graph on the same batch, on this CPU (best of ``rounds`` after a warm-up):
    whether int8 pays here is measured where it runs, not assumed from the CPU's flags."""
    from flowerfeat.runtime import OnnxModel

    x = np.ascontiguousarray(x, np.float32)
    speed = {"images": len(x)}
    for name, path in (("int8", int8), ("fp32", fp32)):
        speed[f"{name}_images_per_s"] = images_per_s(OnnxModel(path).session, x, rounds)
    speed["int8_over_fp32"] = speed["int8_images_per_s"] / speed["fp32_images_per_s"]
    return speed


def images_per_s(session, x: np.ndarray, rounds: int = 2) -> float:
    """Images/s of an ONNX Runtime ``session`` on the batch ``x``, the best of ``rounds`` after a warm-up."""
    import time

    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def slower_note(record: dict | None) -> str | None:
    """One line where the kept int8 trunk measured slower than fp32 on this CPU when it was made; else None."""
    speed = (record or {}).get("speed") or {}
    ratio = speed.get("int8_over_fp32")
    if ratio is None or ratio >= 1.0:
        return None
    return (f"note: int8 runs at {ratio:.2f}x fp32's speed on this CPU ({speed['int8_images_per_s']:.1f} against "
            f"{speed['fp32_images_per_s']:.1f} images/s, measured when it was made); --precision fp32 is faster "
            "here")  # fmt: skip


def make(trunk, preprocessing, settings: dict, calibration, keep, reporter) -> str:
    """Quantize ``trunk`` into ``keep.model``, calibrated on ``calibration()`` -> (images (N, 3, H, W), their paths),
    record how in ``keep.record``; returns the file's sha256."""
    s = Settings(**settings)
    images, used = calibration()
    keep.model.parent.mkdir(parents=True, exist_ok=True)
    what = f"quantizing the trunk to int8 ({len(images)} calibration images, {s.activations} activations"
    with reporter.stage(what + f"{', reduce_range' if s.reduce_range else ''})"):
        speed = quantize(trunk, preprocessing.input_shape, images, s, keep.model)
    return keep.write_record(settings, calibration_images=used, speed=speed)


def calibration_sample(split, preprocessing, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` readable images of ``split``'s seeded stratified order, preprocessed: (N, 3, H, W), paths."""
    from flowerfeat.data import BadImage, load_image
    from flowerfeat.layouts import stratified_order

    check_calibration(n, len(split.classes))
    transform, images, used = preprocessing.transform(), [], []
    for i in stratified_order(split, seed):
        if len(images) == n:
            break
        try:
            images.append(transform(load_image(split.root / split.items[i].relpath)).numpy())
            used.append(split.items[i].relpath)
        except BadImage:  # an unreadable image calibrates nothing; the next one in the order does
            continue
    return np.stack(images), used


def check_calibration(n: int, n_classes: int) -> None:
    if n < n_classes:
        raise FlowerfeatError(
            f"calibration (--calibration) of {n} images is smaller than the {n_classes} classes; pass at least "
            f"{n_classes}"
        )
