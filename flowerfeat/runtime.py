"""Where and how the trunk runs: device, precision, and the engine (torch, or ONNX Runtime on the CPU)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from flowerfeat.errors import FlowerfeatError


def _cpuinfo(*keys: str) -> str:
    """The value of /proc/cpuinfo's first line starting with one of ``keys`` ("" where none or unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith(keys)), "")
    return line.split(":", 1)[-1].strip()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    return set(_cpuinfo("flags", "Features").split())


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else the machine's architecture."""
    import platform

    return _cpuinfo("model name") or platform.machine()


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


# Small work (a linear head's epochs, scoring a split) runs on one thread: its matrices are too small to pay for a
# second, and threads that wait on each other at every step lose badly to another busy process on a laptop's cores
# (docs/benchmarks.md, "Threads").
SMALL_WORK_THREADS = 1


@contextlib.contextmanager
def threads(n: int = SMALL_WORK_THREADS):
    """torch, and the BLAS under numpy and scikit-learn, on at most ``n`` threads inside the block; the caller's
    settings are back after it (a notebook keeps its own)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def trunk_rows(trunk: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The trunk's float32 rows for a batch already on its device: inference mode, bf16 autocast when asked."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return trunk(x).float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA or a CPU with native bf16 units, else fp32 (emulated bf16 is ~100x slower); int8 is the
    CPU's only (a quantized trunk on ONNX Runtime; auto never picks it, docs/benchmarks.md says why)."""
    if precision == "int8" and device.type != "cpu":
        raise FlowerfeatError(f"--precision int8 runs on the CPU (here: {device}); use bf16 or fp32 on CUDA")
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
# on the CPU in fp32, or the int8 graph quantize.py made (their speed and agreement with torch: docs/benchmarks.md).


def engine_available(engine: str) -> bool:
    import importlib.util

    return engine == "torch" or all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


def resolve_engine(engine: str, device: torch.device, precision: str, previous: str | None = None) -> str:
    """The engine to run: as asked (refused with one line where it cannot run), or for "auto" the one an existing
    cache was made with (so nothing is recomputed), else onnxruntime where it is installed and the run is on the CPU
    in fp32, else torch. int8 runs on onnxruntime only."""
    install = "install the extra: pip install 'flowerfeat[onnx]'"
    if precision == "int8":
        if engine == "torch":
            raise FlowerfeatError("--precision int8 runs on the onnxruntime engine; drop --engine torch")
        if not engine_available("onnxruntime"):
            raise FlowerfeatError(f"--precision int8 needs onnxruntime; {install}")
        return "onnxruntime"
    fits = device.type == "cpu" and precision == "fp32"
    if engine == "auto":
        if previous in ("torch", "onnxruntime") and (previous == "torch" or (fits and engine_available(previous))):
            return previous
        return "onnxruntime" if fits and engine_available("onnxruntime") else "torch"
    if engine == "onnxruntime" and not fits:
        raise FlowerfeatError(
            f"--engine onnxruntime runs on the CPU in fp32 or int8 (here: {device.type}, {precision})"
        )
    if not engine_available(engine):
        raise FlowerfeatError(f"--engine {engine} needs onnxruntime; {install}")
    return engine


def export_onnx(trunk: nn.Module, input_shape: tuple[int, int, int], path: Path) -> None:
    """The torch trunk as an fp32 ONNX graph with a free batch size (input "x", output "rows"), for ONNX Runtime.

    torch.onnx's TorchScript exporter traces it in well under a second where torch.export's takes seconds (Lite0 on
    the Intel AMX machine: 0.4 s against 7.4 s; docs/benchmarks.md, "Preparing an engine"); once the family has fixed
    its shapes (``Backbone.for_tracing``) the two graphs run at the same speed. torch.export's exporter takes over
    where tracing fails."""
    example = torch.zeros(2, *input_shape)
    trunk = trunk.to(memory_format=torch.contiguous_format)
    names = {"input_names": ["x"], "output_names": ["rows"]}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # torch.onnx's progress and notices
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(trunk, (example,), str(path), dynamo=False, dynamic_axes={"x": {0: "batch"},
                              "rows": {0: "batch"}}, **names)  # fmt: skip
            return
        except Exception:  # noqa: BLE001 - any model tracing cannot take goes the general way below
            path.unlink(missing_ok=True)
        torch.onnx.export(
            trunk, (example,), str(path), dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}},
            external_data=False, **names,
        )  # fmt: skip


# ONNX Runtime's intra-op threads wait without spinning (its default spins): a spinning thread holds a core the
# readers decode on. Lite0, 400 shared photos, the pipeline on 2 cores (Intel AMX machine; scripts/pipeline_threads.py,
# docs/benchmarks.md, "Threads"), images/s without spinning against with: beside reader threads 3-9 % faster, beside
# one reader process 12-16 %.
ORT_SPINNING = False


class OnnxModel(nn.Module):
    """An ONNX trunk file run by ONNX Runtime on the CPU, called like the torch trunk: (B, 3, H, W) -> (B, D)."""

    def __init__(self, path: Path, threads: int | None = None, keep_path: bool = True, spin: bool | None = None):
        import onnxruntime

        super().__init__()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # threads that spin between operators hold the cores the readers decode on (docs/benchmarks.md, "Threads")
        spin = ORT_SPINNING if spin is None else spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = Path(path) if keep_path else None  # the file it runs (None: a temporary one, gone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.contiguous().numpy()})[0])


def onnx_trunk(trunk: nn.Module, input_shape: tuple[int, int, int]) -> OnnxModel:
    """``trunk`` exported to ONNX and run by ONNX Runtime; ``input_shape`` (3, H, W) of one preprocessed image. The
    session keeps the graph, so the file may go."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(trunk, input_shape, Path(tmp) / "trunk.onnx")
        return OnnxModel(Path(tmp) / "trunk.onnx", keep_path=False)
