"""Benchmark: the textbook loop vs a naive extraction loop vs flowerfeat, and models side by side, in one run."""

from __future__ import annotations

import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from flowerfeat import runtime, store
from flowerfeat.backbones import get_backbone
from flowerfeat.catalogue import gflops_text
from flowerfeat.config import ExtractConfig, FitConfig, batch_size_for
from flowerfeat.data import Split, UnitDataset, collate_units
from flowerfeat.layouts import scan_data
from flowerfeat.errors import FlowerfeatError
from flowerfeat.recipe import build, resolve


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 1.5) -> float:
    """Best GFLOP/s of an n x n matmul over about ``seconds`` (after one warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def gflop_per_image(trunk: nn.Module, input_shape=(3, 224, 224)) -> float:
    """Counted, not hand-copied: torch's FlopCounterMode over one image (FLOPs: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        trunk(torch.zeros(1, *input_shape))
    return counter.get_total_flops() / 1e9


def subset(split: Split, n: int) -> Split:
    """``n`` items spread evenly over the split (every class represented)."""
    if n >= len(split.items):
        return split
    idx = np.linspace(0, len(split.items) - 1, n).round().astype(int)
    return replace(split, items=tuple(split.items[i] for i in idx))


def _loader(split: Split, batch_size: int, workers: int, transform):
    from torch.utils.data import DataLoader

    ds = UnitDataset(split, 0, transform, None, 0)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_units)


def textbook_loop(train: Split, test: Split, model: nn.Module, last: nn.Module, transform, epochs: int = 2,
                  batch_size: int = 20) -> float:  # fmt: skip
    """The textbook: the whole network in fp32 and train mode, its last layer ``last`` replaced and trained with
    SGD, every epoch through the whole network; then a test pass. Returns seconds."""
    model.requires_grad_(False)
    last.requires_grad_(True)
    opt = torch.optim.SGD(last.parameters(), lr=0.001)
    criterion = nn.CrossEntropyLoss()
    t = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, ids, _bad in _loader(train, batch_size, 0, transform):
            y = torch.tensor([train.items[i].label for i in ids])
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        for x, ids, _bad in _loader(test, batch_size, 0, transform):
            model(x)
    return time.perf_counter() - t


def naive_loop(split: Split, trunk: nn.Module, transform, batch_size: int = 20) -> float:
    """Extraction with no tricks: fp32, NCHW, no_grad, decoding in the main process. Returns seconds."""
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ids, _bad in _loader(split, batch_size, 0, transform):
            trunk(x)
    return time.perf_counter() - t


def row_cosines(a, b) -> np.ndarray:
    """(N,) cosine similarity of each row of ``a`` with the same row of ``b`` (any shape (N, ...), as float64)."""
    a, b = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (a, b))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def cosine_agreement(trunk: nn.Module, split: Split, n: int, transform) -> float:
    """Mean cosine similarity of bf16-autocast vs fp32 features over ``n`` images."""
    sub = subset(split, n)
    ds = UnitDataset(sub, 0, transform, None, 0)
    x, _ids, _ = collate_units([ds[i] for i in range(len(ds))])
    x = x.contiguous(memory_format=torch.channels_last)
    a, b = runtime.trunk_rows(trunk, x, "fp32"), runtime.trunk_rows(trunk, x, "bf16")
    return float(row_cosines(a.numpy(), b.numpy()).mean())


def fit_timing(n: int, dim: int, n_classes: int) -> float:
    """Seconds for fit-head's default 2 epochs on n x dim synthetic fc7-like rows (training only, in memory)."""
    from flowerfeat.store import Features
    from flowerfeat.train import fit

    rng = np.random.default_rng(0)
    y = rng.integers(0, n_classes, n)
    x = np.maximum(rng.normal(0, 1, (n, dim)) + y[:, None] * 0.1, 0).astype(np.float32)  # ReLU-like features
    meta = {"classes": [str(c) for c in range(n_classes)], "feature_dim": dim, "layer": "fc7", "cut_dropout": 0.5}
    rows = Features(x, y, meta["classes"], [f"{i}.jpg" for i in range(n)], np.zeros(n, np.int8), [], meta)
    result, _ = fit(FitConfig(epochs=2), train=rows)
    return sum(h["seconds"] for h in result.history)


@dataclass
class BenchResult:
    lines: list[str]
    figures: dict


def keep_engines(folder: Path, kept: Path) -> None:
    """The engine files a run made in its cache ``folder`` (the ONNX export, the int8 model, with their records)
    copied to ``kept``, so the next run of the same trunk loads them instead of exporting or quantizing again."""
    for precision in ("fp32", "int8"):
        files = store.engine_files(folder, precision)
        if files.model.is_file() and files.record.is_file():
            for f in (files.model, files.record):
                shutil.copy2(f, kept / f.name)


def seed_engines(cfg: ExtractConfig, kept: Path) -> None:
    """``cfg``'s new cache folder holding the engine files kept so far (as a rerun of ``features`` finds them)."""
    from flowerfeat.extraction.job import cache_folder

    recipe = resolve(cfg, torch.device("cpu"))
    folder = cache_folder(cfg, recipe.backbone, recipe.layer, recipe.weights)
    folder.mkdir(parents=True, exist_ok=True)
    for f in kept.iterdir():
        shutil.copy2(f, folder / f.name)


def _flowerfeat_run(cfg: ExtractConfig, train: Split, test: Split, fig: dict, kept: Path) -> str:
    """(c) flowerfeat end to end on the two subsets: features, fit-head --epochs 2, report; returns the overall line."""
    from flowerfeat.extraction import run_extraction
    from flowerfeat.heads import LinearHead, score
    from flowerfeat.report import Evaluation, textbook_lines
    from flowerfeat.store import load_features
    from flowerfeat.train import fit

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = run_extraction(cfg.replace(out=Path(tmp)), splits={"train": train, "test": test})
        keep_engines(results[0].path.parent, kept)
        fig["engine"] = load_features(results[1].path).meta["engine"]
        fig["extract_s"] = sum(r.seconds for r in results)
        fig["loop_s"] = sum(r.loop_s for r in results)  # the rest: the engine prepared (once per cache), files set up
        t1 = time.perf_counter()
        result, _ = fit(FitConfig(features=results[0].path, epochs=2))
        t2 = time.perf_counter()
        fs = load_features(results[1].path)
        loss, pred, probs = score(LinearHead.of(result.weight, result.bias), fs.X, fs.y)
        lines = textbook_lines(Evaluation(fs.classes, fs.y, pred, probs, loss, fs.paths, ""))
        fig["flowerfeat_s"] = time.perf_counter() - t0
        fig["fit_s"] = t2 - t1
    fig["flowerfeat_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return lines[-1].strip()


def engine_combos(precision: str) -> list[tuple[str, str]]:
    """(engine, precision) rows to time: torch fp32 (the reference the others are compared with), torch bf16 where
    the CPU has native bf16, onnxruntime fp32, and onnxruntime int8 when asked; the installed engines only."""
    combos = [("torch", "fp32")] + ([("torch", "bf16")] if runtime.cpu_has_bf16() else [])
    combos += [("onnxruntime", "fp32")] + ([("onnxruntime", "int8")] if precision == "int8" else [])
    return [(e, p) for e, p in combos if runtime.engine_available(e)]


def preprocessed(splits: list[Split], transform) -> torch.Tensor:
    """Every image of ``splits`` decoded and preprocessed, held in memory: (N, 3, H, W)."""
    xs = []
    for split in splits:
        ds = UnitDataset(split, 0, transform, None, 0)
        xs.append(collate_units([ds[i] for i in range(len(ds))])[0])
    return torch.cat(xs)


def trunk_alone(cfg: ExtractConfig, folder: Path, x: torch.Tensor) -> float:
    """Images/s of the very trunk a run used (its engine, precision, batch size and threads; the engine file it kept
    in ``folder``) on preprocessed images in memory: the speed the pipeline would have if reading cost nothing."""
    from flowerfeat import store

    recipe = resolve(cfg, torch.device("cpu"))
    keep = store.engine_files(folder, recipe.precision) if recipe.engine == "onnxruntime" else None
    trunk = build(recipe, keep=keep, channels_last=cfg.channels_last)
    batch = batch_size_for("cpu", cfg.batch_size)
    trunk.rows(x[:batch])  # warm-up: first-call allocations and kernel choices
    t = time.perf_counter()
    for start in range(0, len(x), batch):
        trunk.rows(x[start : start + batch])
    return len(x) / (time.perf_counter() - t)


def engine_rows(cfg: ExtractConfig, train: Split, test: Split, log, kept: Path) -> dict:
    """Each installed engine's extraction of the two subsets, side by side: the pipeline's images/s (trunk ready;
    preparing it apart: loading, exporting, quantizing), the same trunk alone on the images preprocessed in memory,
    and agreement with the first (torch) row: min cosine, max abs difference over the largest value. Rows are named
    by engine, ``onnxruntime-int8`` for the quantized trunk."""
    from flowerfeat.extraction import run_extraction
    from flowerfeat.store import load_features

    rows, ref, images = {}, None, None
    n = len(train.items) + len(test.items)
    for engine, precision in engine_combos(cfg.precision):
        with tempfile.TemporaryDirectory() as tmp:
            c = cfg.replace(out=Path(tmp), engine=engine, precision=precision)
            seed_engines(c, kept)  # an export or int8 model an earlier row made is loaded, not made again
            results = run_extraction(c, splits={"train": train, "test": test})
            keep_engines(results[0].path.parent, kept)
            x = np.concatenate([load_features(r.path).X for r in results])
            if images is None:
                images = preprocessed([train, test], resolve(c, torch.device("cpu")).preprocessing.transform())
            alone = trunk_alone(c, results[0].path.parent, images)
        ready_s = sum(r.trunk_s for r in results)
        seconds = sum(r.seconds for r in results) - ready_s  # images/s with the trunk ready
        ref = x if ref is None else ref  # torch comes first
        cos = row_cosines(x, ref)
        name = engine + ("" if precision == "fp32" else f"-{precision}")
        rows[name] = {"images_per_s": n / seconds, "seconds": seconds, "prepare_s": ready_s, "precision": precision}
        rows[name].update(trunk_alone_ips=alone, pipeline_over_trunk=n / seconds / alone)
        rows[name].update(min_cosine=float(cos.min()), median_cosine=float(np.median(cos)))
        rows[name]["max_abs_diff"] = float(np.abs(x - ref).max() / np.abs(ref).max())
        r, first = rows[name], next(iter(rows.values()))
        log(
            f"engine {engine} ({precision}): pipeline {r['images_per_s']:.2f} images/s, trunk alone {alone:.2f} "
            f"(pipeline {r['pipeline_over_trunk']:.2f}x the trunk; {r['images_per_s'] / first['images_per_s']:.2f}x "
            f"torch fp32; {ready_s:.1f} s to prepare: loading, and exporting or quantizing where no earlier row did)"
            f", min cosine to torch {r['min_cosine']:.7f} (median {r['median_cosine']:.7f}), max |diff| "
            f"{r['max_abs_diff']:.1e} of the largest"
        )
    return rows


def bench_images(cfg: ExtractConfig, limit: int) -> tuple[Split, Split]:
    """``limit`` images of ``cfg.data`` spread over the classes, 80 % train and 20 % test."""
    splits = scan_data(Path(cfg.data), ("train", "test"), cfg.test_fraction)
    n_test = max(len(splits["train"].classes), round(limit * 0.2))
    return subset(splits["train"], limit - n_test), subset(splits["test"], n_test)


def run_bench(
    cfg: ExtractConfig,
    limit: int,
    agreement_images: int,
    log: Callable[[str], None] = print,
    others: tuple[ExtractConfig, ...] = (),
) -> BenchResult:
    """Time (a) the textbook loop, (b) a naive extraction loop and (c) flowerfeat on the same ``limit`` images of
    ``cfg.data`` (80 % train, 20 % test), extracting with ``cfg``'s settings, on the CPU; then the ``others``
    models' engines on the same images, side by side."""
    train, test = bench_images(cfg, limit)
    n_images = len(train.items) + len(test.items)
    device = torch.device("cpu")
    cfg = cfg.replace(device="cpu", precision=runtime.resolve_precision(cfg.precision, device))
    recipe = resolve(cfg, device)
    backbone, prec, cut, pre = recipe.backbone, cfg.precision, recipe.layer, recipe.preprocessing
    fig = {"train_images": len(train.items), "test_images": len(test.items), "threads": torch.get_num_threads()}
    fig.update(precision=prec, model=backbone.name, layer=cut, batch_size=cfg.batch_size, workers=cfg.workers)
    log(
        f"{len(train.items)} train + {len(test.items)} test images; model {backbone.name} at {cut}; precision {prec}; "
        f"{torch.get_num_threads()} threads"
    )
    fig["fp32_peak"] = matmul_peak(torch.float32, device)
    fig["bf16_peak"] = matmul_peak(torch.bfloat16, device, n=1024 if not runtime.cpu_has_bf16() else 2048)
    log(f"matmul peak: fp32 {fig['fp32_peak']:.0f} GFLOP/s, bf16 {fig['bf16_peak']:.1f} GFLOP/s")

    naive = build(recipe.exportable(), channels_last=False).module  # plain torch, fp32, NCHW
    fig["gflop_per_image"] = gflop_per_image(naive, pre.input_shape)
    with tempfile.TemporaryDirectory() as kept:  # the engine files the runs make, for the later runs
        overall = _flowerfeat_run(cfg, train, test, fig, Path(kept))
        fig["extract_ips"] = n_images / fig["extract_s"]
        fig["loop_ips"] = n_images / fig["loop_s"]
        fig["flowerfeat_ips"] = n_images / fig["flowerfeat_s"]
        achieved = fig["extract_ips"] * fig["gflop_per_image"]
        fig["peak_kind"] = "bf16" if prec == "bf16" else "fp32"  # int8 against fp32 (no int8 peak is measured)
        peak = fig[f"{fig['peak_kind']}_peak"]
        log(
            f"(c) flowerfeat: {fig['flowerfeat_s']:.1f} s end to end ({fig['flowerfeat_ips']:.2f} images/s); "
            f"extraction {fig['extract_ips']:.2f} images/s = {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the "
            f"{fig['peak_kind']} matmul peak (its loop {fig['loop_ips']:.2f} images/s; preparing the engine and the "
            f"files {fig['extract_s'] - fig['loop_s']:.1f} s, once per cache); fit-head {fig['fit_s']:.2f} s; "
            f"engine {fig['engine']}; {overall}"
        )
        fig["engines"] = engine_rows(cfg, train, test, log, Path(kept))
    transform = pre.transform()
    fig["naive_s"] = naive_loop(train, naive, transform) + naive_loop(test, naive, transform)
    fig["naive_ips"] = n_images / fig["naive_s"]
    log(f"(b) naive loop: {fig['naive_s']:.1f} s ({fig['naive_ips']:.2f} images/s)")
    _textbook_row(recipe, train, test, transform, fig, log)
    fig["fit_2600x4096_s"] = fit_timing(2600, 4096, len(train.classes))
    log(f"fit-head --epochs 2 on 2,600 x 4,096 synthetic rows: {fig['fit_2600x4096_s']:.3f} s")
    if agreement_images:
        fig["bf16_cosine"] = cosine_agreement(naive, test, agreement_images, transform)
        n = min(agreement_images, len(test.items))
        log(f"bf16 vs fp32 features: mean cosine {fig['bf16_cosine']:.5f} over {n} images")
    summary = _summary(fig, achieved, peak, len(train.items), log)
    if others:
        fig["models"] = models_side_by_side(cfg, others, train, test, fig["engines"], log)
    return BenchResult(summary, fig)


def _textbook_row(recipe, train: Split, test: Split, transform, fig: dict, log) -> None:
    """(a) The textbook's loop: the model's whole network, its last layer replaced (offline, a local file holds the
    weights it has: VGG16's conv weights alone)."""
    whole = recipe.backbone.whole_model(recipe.weights, len(train.classes))
    if whole is None:
        log(f"(a) textbook loop: not timed for {recipe.model} (its family gives no whole network)")
        fig["textbook_s"] = fig["textbook_ips"] = float("nan")
        return
    fig["textbook_s"] = textbook_loop(train, test, *whole, transform)
    fig["textbook_ips"] = (len(train.items) + len(test.items)) / fig["textbook_s"]
    log(f"(a) textbook loop: {fig['textbook_s']:.1f} s ({fig['textbook_ips']:.2f} images/s over the image set)")


def models_side_by_side(first: ExtractConfig, others, train: Split, test: Split, first_rows: dict, log) -> list[dict]:
    """Each model's engines on the same images (the first model's rows already measured), then one table: model,
    cut, dimension, GFLOPs (multiply-adds) per image, images/s of its fastest engine and the ratio to the first."""
    table = []
    for cfg, rows in [(first, first_rows)] + [(c, None) for c in others]:
        backbone = get_backbone(cfg.model)
        cut = backbone.cut(cfg.layer)
        if rows is None:
            log(f"--- {backbone.name} at {cut.name} ---")
            precision = runtime.resolve_precision(cfg.precision, torch.device("cpu"))
            with tempfile.TemporaryDirectory() as kept:
                rows = engine_rows(cfg.replace(device="cpu", precision=precision), train, test, log, Path(kept))
        best = max(rows, key=lambda e: rows[e]["images_per_s"])
        gflops = backbone.describe().get("gflops")
        table.append({"model": backbone.name, "layer": cut.name, "dim": cut.dim, "gflops": gflops})
        table[-1].update(engine=best, images_per_s=rows[best]["images_per_s"], engines=rows)
    log("models side by side (fastest engine of each, same images, this run):")
    for row in table:
        ratio = row["images_per_s"] / table[0]["images_per_s"]
        log(
            f"  {row['model']:<28} {row['layer']:<10} {row['dim']:>6}-d  {gflops_text(row['gflops']):>6} GFLOPs  "
            f"{row['images_per_s']:7.2f} images/s ({row['engine']})  {ratio:5.2f}x {table[0]['model']}"
        )
    return table


def _summary(fig: dict, achieved: float, peak: float, n_train: int, log) -> list[str]:
    fig["naive_over_flowerfeat_extract"] = fig["naive_s"] / fig["extract_s"]
    fig["naive_over_flowerfeat_loop"] = fig["naive_s"] / fig["loop_s"]
    fig["textbook_over_flowerfeat"] = fig["textbook_s"] / fig["flowerfeat_s"]  # nan: not timed
    textbook = fig["textbook_over_flowerfeat"]
    summary = [
        f"extraction speed-up over the naive loop (b)/(c): {fig['naive_over_flowerfeat_extract']:.2f}x, the loops "
        f"alone {fig['naive_over_flowerfeat_loop']:.2f}x (a fresh cache's first run prepares its engine once)",
        "end-to-end speed-up over the textbook (a)/(c): "
        + ("not timed" if math.isnan(textbook) else f"{textbook:.2f}x"),
        f"achieved {achieved:.0f} GFLOP/s ({fig['gflop_per_image']:.1f} GFLOP/image) = {achieved / peak:.0%} of the "
        f"measured {fig['peak_kind']} matmul peak ({peak:.0f} GFLOP/s)",
        f"fit-head --epochs 2 on {n_train} rows: {fig['fit_s']:.3f} s; peak RSS during (c): "
        f"{fig['flowerfeat_peak_rss_mib']:.0f} MiB",
    ]
    for s in summary:
        log(s)
    return summary


def model_configs(base: ExtractConfig, choices: list[str], weights: list[str], layer: str | None = None):
    """One ExtractConfig per ``MODEL[@LAYER]``, with its weights from ``MODEL=PATH`` (or one value for all)."""
    from flowerfeat.backbones import parse_choice

    per_model, common = {}, ExtractConfig.weights
    for w in weights:
        name, sep, path = w.partition("=")
        if sep:
            per_model[name] = path
        else:
            common = w
    cfgs = []
    for k, choice in enumerate(choices):
        name, cut = parse_choice(choice)
        own_layer = cut or (layer if k == 0 else None)
        cfgs.append(base.replace(model=name, layer=own_layer, weights=per_model.get(name, common)))
    unknown = sorted(set(per_model) - {c.model for c in cfgs})
    if unknown:
        raise FlowerfeatError(f"--weights {unknown[0]}=...: no --model {unknown[0]} to give them to")
    return cfgs
