"""Benchmark: the textbook loop vs a naive extraction loop vs flowerfeat, on the same images, in one run."""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from flowerfeat import backbone
from flowerfeat.config import ENGINES, ExtractConfig, FitConfig
from flowerfeat.data import Split, UnitDataset, collate_units, scan_data


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


def gflop_per_image(trunk: nn.Module) -> float:
    """Counted, not hand-copied: torch's FlopCounterMode over one 224x224 image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        trunk(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def subset(split: Split, n: int) -> Split:
    """``n`` items spread evenly over the split (every class represented)."""
    if n >= len(split.items):
        return split
    idx = np.linspace(0, len(split.items) - 1, n).round().astype(int)
    return replace(split, items=tuple(split.items[i] for i in idx))


def _loader(split: Split, batch_size: int, workers: int):
    from torch.utils.data import DataLoader

    ds = UnitDataset(split, 0, backbone.build_transform(), None, 0)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_units)


def textbook_loop(train: Split, test: Split, vgg: nn.Module, epochs: int = 2, batch_size: int = 20) -> float:
    """The textbook: full VGG16 fp32 in train mode, classifier[6] replaced and trained with SGD, every epoch
    through the whole network; then a test pass. Returns seconds."""
    n_classes = len(train.classes)
    vgg.classifier[6] = nn.Linear(4096, n_classes)
    for p in vgg.features.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(vgg.classifier[6].parameters(), lr=0.001)
    criterion = nn.CrossEntropyLoss()
    t = time.perf_counter()
    vgg.train()
    for _ in range(epochs):
        for x, ids, _bad in _loader(train, batch_size, 0):
            y = torch.tensor([train.items[i].label for i in ids])
            opt.zero_grad()
            loss = criterion(vgg(x), y)
            loss.backward()
            opt.step()
    vgg.eval()
    with torch.no_grad():
        for x, ids, _bad in _loader(test, batch_size, 0):
            vgg(x)
    return time.perf_counter() - t


def naive_loop(split: Split, trunk: nn.Module, batch_size: int = 20) -> float:
    """Extraction with no tricks: fp32, NCHW, no_grad, decoding in the main process. Returns seconds."""
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ids, _bad in _loader(split, batch_size, 0):
            trunk(x)
    return time.perf_counter() - t


def cosine_agreement(trunk: nn.Module, split: Split, n: int) -> float:
    """Mean cosine similarity of bf16-autocast vs fp32 features over ``n`` images."""
    sub = subset(split, n)
    ds = UnitDataset(sub, 0, backbone.build_transform(), None, 0)
    x, _ids, _ = collate_units([ds[i] for i in range(len(ds))])
    x = x.contiguous(memory_format=torch.channels_last)
    a, b = backbone.trunk_rows(trunk, x, "fp32"), backbone.trunk_rows(trunk, x, "bf16")
    return float(nn.functional.cosine_similarity(a, b, dim=1).mean())


def fit_timing(n: int, dim: int, n_classes: int) -> float:
    """Seconds for fit-head's default 2 epochs on an n x dim feature file (training only, file in memory)."""
    from flowerfeat import store
    from flowerfeat.train import fit

    rng = np.random.default_rng(0)
    y = rng.integers(0, n_classes, n)
    x = np.maximum(rng.normal(0, 1, (n, dim)) + y[:, None] * 0.1, 0).astype(np.float32)  # ReLU-like features
    with tempfile.TemporaryDirectory() as tmp:
        path = store.write_arrays(Path(tmp) / "train.h5", x, y, [str(c) for c in range(n_classes)])
        result, _ = fit(FitConfig(features=path, epochs=2))
    return sum(h["seconds"] for h in result.history)


@dataclass
class BenchResult:
    lines: list[str]
    figures: dict


def _flowerfeat_run(cfg: ExtractConfig, train: Split, test: Split, fig: dict) -> str:
    """(c) flowerfeat end to end on the two subsets: features, fit-head --epochs 2, report; returns the overall line."""
    from flowerfeat.extraction import extract_split, resolve_setup
    from flowerfeat.report import Evaluation, textbook_lines
    from flowerfeat.store import load_features
    from flowerfeat.train import fit, score

    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg.replace(out=Path(tmp))
        setup = resolve_setup(cfg)
        fig["engine"] = setup.engine
        t0 = time.perf_counter()
        results = [extract_split(cfg, split, setup) for split in (train, test)]
        fig["extract_s"] = sum(r.seconds for r in results)
        t1 = time.perf_counter()
        result, _ = fit(FitConfig(features=results[0].path, epochs=2))
        t2 = time.perf_counter()
        fs = load_features(results[1].path)
        loss, pred, probs = score(result.weight, result.bias, fs.X, fs.y)
        lines = textbook_lines(Evaluation(fs.classes, fs.y, pred, probs, loss, fs.paths, ""))
        fig["flowerfeat_s"] = time.perf_counter() - t0
        fig["fit_s"] = t2 - t1
    fig["flowerfeat_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return lines[-1].strip()


def engine_rows(cfg: ExtractConfig, train: Split, test: Split, log) -> dict:
    """Each installed engine's extraction of the two subsets, side by side: images/s (trunk ready; preparing it
    apart), and agreement with the torch engine's rows (min cosine, max abs difference over the largest value)."""
    from flowerfeat.extraction import extract_split, resolve_setup
    from flowerfeat.store import load_features

    rows, ref = {}, None
    n = len(train.items) + len(test.items)
    for engine in (e for e in ENGINES if backbone.engine_available(e)):
        with tempfile.TemporaryDirectory() as tmp:
            c = cfg.replace(out=Path(tmp), engine=engine)
            setup = resolve_setup(c)
            t = time.perf_counter()
            setup.get_trunk()
            ready_s = time.perf_counter() - t
            results = [extract_split(c, split, setup) for split in (train, test)]
            x = np.concatenate([load_features(r.path).X for r in results])
        seconds = sum(r.seconds for r in results)
        ref = x if ref is None else ref  # torch comes first
        cos = (x * ref).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
        rows[engine] = {"images_per_s": n / seconds, "seconds": seconds, "prepare_s": ready_s}
        rows[engine].update(min_cosine=float(cos.min()), max_abs_diff=float(np.abs(x - ref).max() / np.abs(ref).max()))
        r = rows[engine]
        log(
            f"engine {engine}: {r['images_per_s']:.2f} images/s ({r['images_per_s'] / rows['torch']['images_per_s']:.2f}x "
            f"torch; {ready_s:.1f} s to prepare), min cosine to torch {r['min_cosine']:.7f}, max |diff| "
            f"{r['max_abs_diff']:.1e} of the largest value"
        )
    return rows


def run_bench(cfg: ExtractConfig, limit: int, agreement_images: int, log: Callable[[str], None] = print) -> BenchResult:
    """Time (a) the textbook loop, (b) a naive extraction loop and (c) flowerfeat on the same ``limit`` images of
    ``cfg.data`` (80 % train, 20 % test), extracting with ``cfg``'s settings, on the CPU."""
    splits = scan_data(Path(cfg.data), ("train", "test"), cfg.test_fraction)
    n_test = max(len(splits["train"].classes), round(limit * 0.2))
    train, test = subset(splits["train"], limit - n_test), subset(splits["test"], n_test)
    n_images = len(train.items) + len(test.items)
    device = torch.device("cpu")
    cfg = cfg.replace(device="cpu", precision=backbone.resolve_precision(cfg.precision, device))
    prec, info = cfg.precision, backbone.resolve_weights(cfg.weights)
    fig = {"train_images": len(train.items), "test_images": len(test.items), "threads": torch.get_num_threads()}
    fig.update(precision=prec, layer=cfg.layer, batch_size=cfg.batch_size, workers=cfg.workers)
    log(
        f"{len(train.items)} train + {len(test.items)} test images; layer {cfg.layer}; precision {prec}; "
        f"{torch.get_num_threads()} threads"
    )
    fig["fp32_peak"] = matmul_peak(torch.float32, device)
    fig["bf16_peak"] = matmul_peak(torch.bfloat16, device, n=1024 if not backbone.cpu_has_bf16() else 2048)
    log(f"matmul peak: fp32 {fig['fp32_peak']:.0f} GFLOP/s, bf16 {fig['bf16_peak']:.1f} GFLOP/s")

    naive = backbone.build_trunk(info, cfg.layer, cfg.weights)
    fig["gflop_per_image"] = gflop_per_image(naive)
    overall = _flowerfeat_run(cfg, train, test, fig)
    fig["extract_ips"] = n_images / fig["extract_s"]
    fig["flowerfeat_ips"] = n_images / fig["flowerfeat_s"]
    achieved = fig["extract_ips"] * fig["gflop_per_image"]
    peak = fig["bf16_peak"] if prec == "bf16" else fig["fp32_peak"]
    log(
        f"(c) flowerfeat: {fig['flowerfeat_s']:.1f} s end to end ({fig['flowerfeat_ips']:.2f} images/s); extraction "
        f"{fig['extract_ips']:.2f} images/s = {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the {prec} matmul peak; "
        f"fit-head {fig['fit_s']:.2f} s; engine {fig['engine']}; {overall}"
    )
    fig["engines"] = engine_rows(cfg, train, test, log)

    fig["naive_s"] = naive_loop(train, naive) + naive_loop(test, naive)
    fig["naive_ips"] = n_images / fig["naive_s"]
    log(f"(b) naive loop: {fig['naive_s']:.1f} s ({fig['naive_ips']:.2f} images/s)")

    # the textbook's whole VGG16; offline the conv weights alone (pool5) are what a local file holds
    vgg = backbone.load_vgg16(info, "pool5" if info.kind != "torchvision" else "fc7", cfg.weights)
    fig["textbook_s"] = textbook_loop(train, test, vgg)
    fig["textbook_ips"] = n_images / fig["textbook_s"]
    log(f"(a) textbook loop: {fig['textbook_s']:.1f} s ({fig['textbook_ips']:.2f} images/s over the image set)")

    fig["fit_2600x4096_s"] = fit_timing(2600, 4096, len(train.classes))
    log(f"fit-head --epochs 2 on 2,600 x 4,096 synthetic rows: {fig['fit_2600x4096_s']:.3f} s")
    if agreement_images:
        fig["bf16_cosine"] = cosine_agreement(naive, test, agreement_images)
        log(
            f"bf16 vs fp32 features: mean cosine {fig['bf16_cosine']:.5f} over {min(agreement_images, len(test.items))} images"
        )
    return BenchResult(_summary(fig, achieved, peak, len(train.items), log), fig)


def _summary(fig: dict, achieved: float, peak: float, n_train: int, log) -> list[str]:
    fig["naive_over_flowerfeat_extract"] = fig["naive_s"] / fig["extract_s"]
    fig["textbook_over_flowerfeat"] = fig["textbook_s"] / fig["flowerfeat_s"]
    summary = [
        f"extraction speed-up over the naive loop (b)/(c): {fig['naive_over_flowerfeat_extract']:.2f}x",
        f"end-to-end speed-up over the textbook (a)/(c): {fig['textbook_over_flowerfeat']:.2f}x",
        f"achieved {achieved:.0f} GFLOP/s ({fig['gflop_per_image']:.1f} GFLOP/image) = {achieved / peak:.0%} of the "
        f"measured {fig['precision']} matmul peak ({peak:.0f} GFLOP/s)",
        f"fit-head --epochs 2 on {n_train} rows: {fig['fit_s']:.3f} s; peak RSS during (c): "
        f"{fig['flowerfeat_peak_rss_mib']:.0f} MiB",
    ]
    for s in summary:
        log(s)
    return summary
