"""Where and how the trunk runs: device, precision, and the engine (torch, or ONNX Runtime on the CPU)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flowerfeat.errors import FlowerfeatError


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def trunk_rows(trunk: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The trunk's float32 rows for a batch already on its device: inference mode, bf16 autocast when asked."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return trunk(x).float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA or a CPU with native bf16 units, else fp32 (emulated bf16 is ~100x slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlowerfeatError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------
# Engines: what runs the trunk. "torch" is the reference; "onnxruntime" runs the same graph, exported once per process,
# on the CPU in fp32 (its speed and agreement with torch: docs/benchmarks.md).


def engine_available(engine: str) -> bool:
    import importlib.util

    return engine == "torch" or all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


def resolve_engine(engine: str, device: torch.device, precision: str, previous: str | None = None) -> str:
    """The engine to run: as asked (refused with one line where it cannot run), or for "auto" the one an existing
    cache was made with (so nothing is recomputed), else onnxruntime where it is installed and the run is on the CPU
    in fp32, else torch."""
    fits = device.type == "cpu" and precision == "fp32"
    if engine == "auto":
        if previous in ("torch", "onnxruntime") and (previous == "torch" or (fits and engine_available(previous))):
            return previous
        return "onnxruntime" if fits and engine_available("onnxruntime") else "torch"
    if engine == "onnxruntime" and not fits:
        raise FlowerfeatError(f"--engine onnxruntime runs on the CPU in fp32 (here: {device.type}, {precision})")
    if not engine_available(engine):
        raise FlowerfeatError(f"--engine {engine} needs onnxruntime; install the extra: pip install 'flowerfeat[onnx]'")
    return engine


class OnnxTrunk(nn.Module):
    """A trunk run by ONNX Runtime: exported from the torch trunk once (free batch size), called like it."""

    def __init__(self, trunk: nn.Module, input_shape: tuple[int, int, int], threads: int | None = None):
        import contextlib
        import io
        import tempfile

        import onnxruntime

        super().__init__()
        example = torch.zeros(2, *input_shape)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            path = f"{tmp}/trunk.onnx"
            trunk = trunk.to(memory_format=torch.contiguous_format)
            torch.onnx.export(
                trunk, (example,), path, dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}},
                input_names=["x"], output_names=["rows"], external_data=False,
            )  # fmt: skip
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().numpy()  # ONNX Runtime takes NCHW float32
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


def on_engine(trunk: nn.Module, engine: str, input_shape: tuple[int, int, int]) -> nn.Module:
    """``trunk`` as ``engine`` runs it; ``input_shape`` (3, H, W) of one preprocessed image."""
    return OnnxTrunk(trunk, input_shape) if engine == "onnxruntime" else trunk
