"""``--engine auto --precision auto`` on a CPU: torch or ONNX Runtime, whichever runs this model's cut faster here,
measured once per model, cut and CPU kind and kept in the user's cache folder. Torch runs in bf16 where the CPU has
native bf16 units, else in fp32; ONNX Runtime in fp32.

Neither wins everywhere: on a 2-core Intel Xeon with AMX, EfficientNet-Lite0 runs at 245 images/s on ONNX Runtime
fp32 and 125 on torch bf16 (depthwise convolutions gain little from bf16), while VGG16's dense convolutions run 3.6x
faster in torch bf16 (38.2 against 10.7; docs/engines.md). Without bf16 units ONNX Runtime led wherever it was
measured (Lite0 on the AVX2 machine 71.3 against 22.4), but VGG16's convolutions there were not: torch's reached 83 %
of that CPU's matmul peak, so the choice is measured there too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flowerfeat import runtime, store
from flowerfeat.progress import Reporter
from flowerfeat.recipe import Recipe, Trunk, build

KEPT = "fastest.json"  # in the user's cache folder (store.user_cache)
BATCH = 8  # images a timed call runs: enough to reach the engine's steady speed, small enough for VGG16 on 2 cores


def needed(cfg_engine: str, cfg_precision: str, device: torch.device, past_engine: str | None) -> bool:
    """True where auto has two candidates to choose from and nothing chose yet (an existing cache keeps its own)."""
    return (
        cfg_engine == cfg_precision == "auto" and device.type == "cpu" and past_engine is None
        and runtime.engine_available("onnxruntime")
    )  # fmt: skip


def candidates() -> list[tuple[str, str]]:
    """(engine, precision) pairs auto measures on this CPU: torch at its native precision, ONNX Runtime fp32."""
    return [("torch", runtime.resolve_precision("auto", torch.device("cpu"))), ("onnxruntime", "fp32")]


def cpu_kind() -> str:
    """The CPU's model name and the flags that decide its kernels, with the engines' versions: a kept choice is
    made again on another CPU or after an upgrade."""
    import onnxruntime

    name = runtime.cpu_name()
    flags = sorted(runtime.cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
    return f"{name} [{' '.join(flags)}] {torch.get_num_threads()} threads; torch {torch.__version__}, onnxruntime " \
        f"{onnxruntime.__version__}"  # fmt: skip


def choose(
    recipe: Recipe, folder: Path, reporter: Reporter, channels_last: bool = True, measure: bool = True
) -> tuple[Recipe, Trunk | None]:
    """``recipe`` with the faster candidate's engine and precision, and that trunk when it was built to measure
    (None when the choice was kept from an earlier run). The ONNX file exported to measure stays in the cache
    folder, where the run reuses it if ONNX Runtime wins (else it is removed). Without ``measure`` (torchrun's ranks
    must agree), a kept choice or else ``recipe`` as resolved."""
    key = f"{recipe.model}@{recipe.layer} on {cpu_kind()}"
    path = store.user_cache(KEPT)
    kept = _read(path)
    if key in kept:
        engine, precision = kept[key]["chosen"]
        return recipe.replace(engine=engine, precision=precision), None
    if not measure:
        return recipe, None
    speeds, trunks = _measure(recipe, folder, reporter, channels_last)
    (engine, precision), _ = max(speeds.items(), key=lambda kv: kv[1])
    line = ", ".join(f"{e} {p} {v:.1f}" for (e, p), v in speeds.items())
    reporter.status(f"auto: {engine} {precision} runs {recipe.model} {recipe.layer} fastest here ({line} images/s; "
                    f"kept in {path})")  # fmt: skip
    if engine != "onnxruntime":  # the export made to measure is not the cache's engine: not kept
        files = store.engine_files(folder, "fp32")
        for f in (files.model, files.record):
            f.unlink(missing_ok=True)
    kept[key] = {"chosen": [engine, precision], "images_per_s": {f"{e} {p}": v for (e, p), v in speeds.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(path, json.dumps(kept, indent=1) + "\n")
    return trunks[engine].recipe, trunks[engine]


def _measure(recipe: Recipe, folder: Path, reporter: Reporter, channels_last: bool):
    """({(engine, precision): images/s}, {engine: trunk}) for the candidates that run; torch always does, an
    export ONNX Runtime cannot take is named and left out."""
    speeds, trunks = {}, {}
    for engine, precision in candidates():
        r = recipe.replace(engine=engine, precision=precision)
        keep = store.engine_files(folder, precision) if engine == "onnxruntime" else None
        built = trunks["torch"].module if "torch" in trunks else None  # the export traces it: no second loading
        try:
            trunks[engine] = build(r, keep=keep, channels_last=channels_last, reporter=reporter, torch_trunk=built)
        except Exception as e:  # noqa: BLE001 -- an operator the exporter or ONNX Runtime lacks: torch runs it
            if engine == "torch":
                raise
            reporter.status(f"auto: {engine} cannot run {recipe.model} {recipe.layer} ({type(e).__name__}); not timed")
            continue
        speeds[(engine, precision)] = images_per_s(trunks[engine])
    return speeds, trunks


def images_per_s(trunk: Trunk, batch: int = BATCH) -> float:
    """The trunk's speed on a batch of random preprocessed images: one call to warm up, the best of two timed."""
    x = torch.randn(batch, *trunk.recipe.preprocessing.input_shape)
    trunk.rows(x)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        trunk.rows(x)
        best = min(best, time.perf_counter() - t)
    return batch / best


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
