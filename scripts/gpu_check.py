"""GPU extractor check (run by scripts/gpu_check.sh on a CUDA machine with no internet; the default steps are meant
to take under 5 minutes on an H100; `--steps sweep,threads,profile` adds the workers/threads sweeps and a profile of
a no-op CLI run).

Synthesises realistic JPEGs (random sizes from 320x240 to 500x375, photo-like texture, plus grayscale, EXIF-rotated,
progressive and CMYK files in the test split), then prints, for `--decode gpu` (nvjpeg on the device) and
`--decode hybrid` (libjpeg in the workers, resize on the device):
  - the GPU's bf16 matmul peak, measured in the same run;
  - end-to-end images/s of `flowerfeat features` (JPEG files on disk -> finished HDF5), cold as a user runs the CLI
    and warm (in a process that has already run once), eager and compiled, with the loop's read/issue/write times;
  - model-only images/s, the loader alone, and the device-side preparation alone (decode, resize, normalise);
  - agreement of each path (bf16) with the CPU fp32 path (PIL) on the same images;
  - `fit-head --train-top` on the device: activations of the model's first cut below a trainable top, with two
    augmented views, for --top-images training files, and two epochs' seconds (rows/s of the second);
  - with real photos and weights carried along (--photos, --weights), pool5 features of both paths written to
    --out (for a probe, or a comparison with CPU features made elsewhere), and their agreement with the CPU fp32
    path on the first --real-ref test photos of each class.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from flowerfeat import store
from flowerfeat.bench import gflop_per_image, matmul_peak
from flowerfeat.bench import row_cosines as cosine
from flowerfeat.config import ExtractConfig
from flowerfeat.extraction import default_workers, reader, run_extraction
from flowerfeat.recipe import build, resolve

KINDS = ("plain", "gray", "exif", "progressive", "cmyk")


def _synth_one(args):
    i, root = args
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = int(rng.integers(320, 501)), int(rng.integers(240, 376))
    if rng.random() < 0.2:
        w, h = h, w  # some portrait photos
    small = rng.integers(0, 255, (h // 12 + 1, w // 12 + 1, 3)).astype(np.float32)
    big = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img = Image.fromarray(np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8))  # sensor-like grain
    split = "test" if i % 20 == 0 else "train"
    kind = KINDS[(i // 20) % len(KINDS)] if split == "test" else "plain"
    d = Path(root) / split / f"class{i % 5}"
    d.mkdir(parents=True, exist_ok=True)
    path, kw = d / f"{kind}_{i:06d}.jpg", {"quality": 90}
    if kind == "gray":
        img = img.convert("L")
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 2 + (i // 100) % 7  # orientations 2..8
        kw["exif"] = exif.tobytes()
    elif kind == "progressive":
        kw["progressive"] = True
    elif kind == "cmyk":
        img = img.convert("CMYK")
    img.save(path, **kw)
    return path.stat().st_size


def synth(root: Path, n: int, copies: int) -> tuple[int, float]:
    """n JPEGs, then ``copies`` hard-linked names for each training file (distinct files to the extractor)."""
    with Pool(os.cpu_count()) as pool:
        sizes = pool.map(_synth_one, [(i, str(root)) for i in range(n)], chunksize=64)
    for p in sorted((root / "train").rglob("*.jpg")):
        for c in range(1, copies):
            os.link(p, p.with_name(f"copy{c}_{p.name}"))
    return sum(1 for _ in (root / "train").rglob("*.jpg")), float(np.mean(sizes))


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu only for --smoke


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def model_only(cfg: ExtractConfig, batch: int, iters: int = 20, compile: bool = False) -> tuple[float, float, float]:
    """(images/s, seconds of the first call, which includes compiling, GFLOP per image) for the trunk of ``cfg``
    alone, bf16 on random input."""
    recipe = resolve(cfg.replace(precision="bf16", engine="torch"), DEV)
    trunk = build(recipe, DEV, compile=compile)
    gflop = gflop_per_image(build(recipe.exportable(), channels_last=False).module, recipe.preprocessing.input_shape)
    x = torch.randn(batch, *recipe.preprocessing.input_shape, device=DEV)
    t = time.perf_counter()
    trunk.rows(x)
    sync()
    first = time.perf_counter() - t
    for _ in range(min(2, iters)):
        trunk.rows(x)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        trunk.rows(x)
    sync()
    return iters * batch / (time.perf_counter() - t), first, gflop


def raw_dataset(cfg: ExtractConfig, n: int | None = None, mode: str = "gpu"):
    """The dataset of the gpu (workers read bytes) or hybrid (workers decode) mode over the first ``n`` (default all)
    synthetic training files, with the preprocessing of ``cfg``'s model."""
    from flowerfeat.layouts import scan_data
    from flowerfeat.gpudecode import DecodedUnitDataset, RawUnitDataset

    split = scan_data(cfg.data, ("train",))["train"]
    split = dataclasses.replace(split, items=split.items[:n])
    pre = resolve(cfg, DEV).preprocessing
    return (DecodedUnitDataset if mode == "hybrid" else RawUnitDataset)(split, 0, pre.transform(), None, 0)


def raw_batches(cfg: ExtractConfig, batch: int, n: int = 4096, mode: str = "gpu"):
    from flowerfeat.gpudecode import collate_raw

    ds = raw_dataset(cfg, n, mode)
    return [collate_raw([ds[i] for i in range(s, min(s + batch, len(ds)))]) for s in range(0, len(ds), batch)]


def prep_rates(cfg: ExtractConfig, batches) -> dict:
    """images/s of the device-side preparation alone: nvjpeg decode only (JPEG batches), then the whole prepare() on 1
    and 2 threads (for decoded batches: pinning, the copy to the device, resize and normalisation)."""
    from flowerfeat.gpudecode import GpuPreprocess

    n = sum(len(b.units) for b in batches)
    pre = GpuPreprocess(DEV, resolve(cfg, DEV).preprocessing)
    out = {}
    runs = [
        ("prepare_1_thread", lambda: list(pre.batches(batches, 1))),
        ("prepare_2_threads", lambda: list(pre.batches(batches, 2))),
    ]
    if batches[0].shapes is None:
        runs.insert(0, ("decode_only", lambda: [pre._decode(list(torch.split(b.blob, b.lengths))) for b in batches]))
    for name, run in runs:
        run()
        sync()
        t = time.perf_counter()
        run()
        sync()
        out[name] = round(n / (time.perf_counter() - t))
    return out


def loader_rate(cfg: ExtractConfig, batch: int, workers: int, mode: str = "gpu") -> float:
    """images/s of the DataLoader alone: workers read bytes and JPEG headers (gpu), or also decode (hybrid)."""
    from torch.utils.data import DataLoader

    from flowerfeat.gpudecode import collate_raw

    ds = raw_dataset(cfg, mode=mode)
    sampler = [list(range(i, min(i + batch, len(ds)))) for i in range(0, len(ds), batch)]
    t = time.perf_counter()
    n = sum(
        len(b.units)
        for b in DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_raw, prefetch_factor=4)
    )
    return n / (time.perf_counter() - t)


def cli_args(cfg: ExtractConfig, out: Path) -> list[str]:
    """`python -m flowerfeat features` over the synthetic train split, as a user would type it (without python)."""
    layer = ["--layer", cfg.layer] if cfg.layer else []
    return ["-m", "flowerfeat", "features", "--data", str(cfg.data), "--out", str(out), "--weights", "none",
            "--model", cfg.model, *layer, "--split", "train"]  # fmt: skip


def load(out: Path, split: str):
    """The split's features under an --out folder (one extraction each here: <out>/<layer>-<weights>/)."""
    return store.load_features(store.find_features(out, split))


def e2e(cfg: ExtractConfig) -> dict:
    t = time.perf_counter()
    res = run_extraction(cfg)[0]
    dt = time.perf_counter() - t
    return {
        "rows": res.rows,
        "seconds": round(dt, 2),
        "images_per_s": round(res.rows / dt),
        "loop_s": round(res.loop_s, 2),
        "loop_images_per_s": round(res.computed / res.loop_s),
        "finish_s": round(res.finish_s, 2),
        "read_wait_s": round(res.read_s, 2),
        "issue_s": round(res.compute_s, 2),
        "write_s": round(res.write_s, 2),
    }


@dataclasses.dataclass
class Context:
    """What every step reads: the arguments, the results so far, the synthetic photos and the base config."""

    a: argparse.Namespace
    r: dict
    tmp: Path
    root: Path
    base: ExtractConfig
    iters: int
    peak_n: int
    n_train: int = 0
    fx: object = None  # flowerfeat.extraction.reader, whose PREP_THREADS the threads step sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vgg16", help="the model to time (random weights are fine for speed)")
    ap.add_argument("--layer", default=None, help="its cut (default: the model's first; vgg16: fc7)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--real-ref", type=int, default=20, help="test photos per class for the real photos' CPU reference")
    ap.add_argument("--top-cut", default=None, help="the top step's cut (default: the model's first below a top)")
    ap.add_argument("--top-images", type=int, default=1000, help="training files (2 views each) the top step trains on")
    ap.add_argument("--budget", type=float, default=300, help="seconds after which optional steps are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script itself")
    ap.add_argument(
        "--steps",
        default="cold,warm,parts,agreement,real,top,compile",
        help="comma-separated steps: cold, warm, parts, agreement, real, top, compile, sweep, threads, profile",
    )
    return ap.parse_args(argv)


def step_peak(c: Context) -> None:
    c.r["bf16_matmul_tflops"] = round(matmul_peak(torch.bfloat16, DEV, n=c.peak_n) / 1000)
    print(f"bf16 matmul peak: {c.r['bf16_matmul_tflops']} TFLOP/s", flush=True)


def step_cold(c: Context) -> None:  # the CLI in a fresh process, as a user runs it: python start, imports, cuDNN tuning included
    cmd = [sys.executable, *cli_args(c.base, c.tmp / "cli"), "--batch-size", str(c.a.batch)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    print(p.stdout[-800:], p.stderr[-800:], flush=True)
    c.r["cold_cli"] = {"seconds": round(dt, 2), "images_per_s": round(c.n_train / dt), "rc": p.returncode}
    print(f"cold_cli: {c.n_train} images, {dt:.1f} s", flush=True)
    t = time.perf_counter()
    code = (
        "import torch, flowerfeat.cli, flowerfeat.extraction; torch.cuda.is_available() and torch.zeros(1).cuda()"
    )
    subprocess.run([sys.executable, "-c", code])
    c.r["import_and_cuda_init_s"] = round(time.perf_counter() - t, 2)
    shutil.rmtree(c.tmp / "cli")


def step_warm(c: Context) -> None:  # in this process, after one run has tuned cuDNN and started nvjpeg; default workers
    run_extraction(c.base.replace(out=c.tmp / "warmup", splits=("test",)))
    c.r["warm"] = {}
    for label, cfg in (
        ("gpu", c.base.replace(out=c.tmp / "a")),
        ("gpu_again", c.base.replace(out=c.tmp / "b")),
        ("hybrid", c.base.replace(out=c.tmp / "h", decode="hybrid")),
        ("hybrid_again", c.base.replace(out=c.tmp / "h2", decode="hybrid")),
    ):
        c.r["warm"][label] = e2e(cfg)
        print(f"WARM end to end {label}: {c.r['warm'][label]}", flush=True)
    fa, fb = (load(c.tmp / d, "train") for d in ("a", "b"))
    assert fa.paths == fb.paths
    c.r["repeat_max_abs_diff"] = float(np.abs(fa.X - fb.X).max())
    c.r["repeat_min_cosine"] = float(cosine(fa.X, fb.X).min())
    fh = load(c.tmp / "h", "train")
    c.r["hybrid_vs_gpu_min_cosine"] = float(cosine(fa.X, fh.X).min())
    print(
        f"two identical runs: max |diff| {c.r['repeat_max_abs_diff']:.3g}, min cosine {c.r['repeat_min_cosine']:.6f}; "
        f"hybrid vs gpu: min cosine {c.r['hybrid_vs_gpu_min_cosine']:.5f}",
        flush=True,
    )
    for d in ("b", "h2"):
        shutil.rmtree(c.tmp / d)


def step_parts(c: Context) -> None:
    ips, _, gflop = model_only(c.base, c.a.batch, c.iters)
    c.r[f"model_only_b{c.a.batch}"] = {"images_per_s": round(ips), "gflop_per_image": round(gflop, 2)}
    print(f"model only {c.a.model} bf16 batch {c.a.batch}: {ips:.0f} images/s = {ips * gflop / 1000:.0f} TFLOP/s",
          flush=True)  # fmt: skip
    c.r["loader_w8"] = round(loader_rate(c.base, c.a.batch, 8))
    print(f"loader only, 8 workers reading: {c.r['loader_w8']} images/s", flush=True)
    hw = default_workers("hybrid", DEV)
    c.r[f"loader_hybrid_w{hw}"] = round(loader_rate(c.base, c.a.batch, hw, "hybrid"))
    print(f"loader only, {hw} workers decoding (hybrid): {c.r[f'loader_hybrid_w{hw}']} images/s", flush=True)
    c.r["prep"] = prep_rates(c.base, raw_batches(c.base, c.a.batch))
    print(f"GPU preparation alone, nvjpeg (images/s): {c.r['prep']}", flush=True)
    c.r["prep_hybrid"] = prep_rates(c.base, raw_batches(c.base, c.a.batch, mode="hybrid"))
    print(f"GPU preparation alone, decoded in the workers (images/s): {c.r['prep_hybrid']}", flush=True)


def step_agreement(c: Context) -> None:  # synthetic test split, odd files included, several batches: each path vs the CPU fp32 PIL path
    ref = c.base.replace(out=c.tmp / "ac", splits=("test",), precision="fp32", decode="cpu", device="cpu")
    run_extraction(ref.replace(batch_size=32, workers=4))
    fc = load(c.tmp / "ac", "test")
    for mode in ("gpu", "hybrid"):
        run_extraction(c.base.replace(out=c.tmp / f"ag_{mode}", splits=("test",), batch_size=64, decode=mode))
        fg = load(c.tmp / f"ag_{mode}", "test")
        assert fg.paths == fc.paths, f"{mode} and CPU paths kept different images"
        cos = cosine(fg.X, fc.X)
        res = c.r[f"agreement_synthetic_{mode}"] = {
            "images": len(cos),
            "mean": float(cos.mean()),
            "min": float(cos.min()),
        }
        for kind in KINDS:
            k = np.array([Path(p).name.startswith(kind) for p in fg.paths])
            res[f"min_{kind}"] = float(cos[k].min()) if k.any() else None
        print(f"agreement {mode} (bf16) vs CPU (fp32, PIL), synthetic: {res}", flush=True)


def step_real(c: Context) -> None:  # real photos and weights: both modes' features come back in --out; a CPU fp32 reference on a subset
    w = c.tmp / "w.pth"  # gpu_payload.py carries the weights in float16
    torch.save({k: v.float() for k, v in torch.load(c.a.weights, weights_only=True).items()}, w)
    photos = c.a.photos / "test" if (c.a.photos / "test").is_dir() else c.a.photos  # <class>/ folders: every photo
    cfg = ExtractConfig(data=photos, out=c.a.out, layer="pool5", weights=str(w), batch_size=c.a.batch)
    cfg = cfg.replace(dtype="float16", compression="gzip", splits=("train",))
    for mode, out in (("gpu", "real"), ("hybrid", "real_hybrid")):
        t = time.perf_counter()
        res = run_extraction(cfg.replace(out=c.a.out / out, decode=mode))
        dt = time.perf_counter() - t
        rows = sum(x.rows for x in res)
        c.r[f"{out}_extract"] = {"rows": rows, "seconds": round(dt, 2), "images_per_s": round(rows / dt)}
        print(f"real photos pool5, {mode}: {c.r[f'{out}_extract']}", flush=True)
    sub = c.tmp / "real_subset"  # the first --real-ref photos of each class, for the CPU fp32 PIL path
    for cls in sorted(d for d in photos.iterdir() if d.is_dir()):
        (sub / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[: c.a.real_ref]:
            (sub / cls.name / f.name).symlink_to(f.resolve())
    ref = cfg.replace(data=sub, out=c.tmp / "real_cpu", precision="fp32", decode="cpu")
    run_extraction(ref.replace(device="cpu", batch_size=32, workers=4, dtype="float32", compression="none"))
    fc = load(c.tmp / "real_cpu", "train")
    for out in ("real", "real_hybrid"):
        fg = load(c.a.out / out, "train")
        rows = {p: i for i, p in enumerate(fg.paths)}
        cos = cosine(fg.X[[rows[p] for p in fc.paths]].astype(np.float32), fc.X)
        c.r[f"{out}_vs_cpu_fp32"] = {"images": len(cos), "mean": float(cos.mean()), "min": float(cos.min())}
        how = f"{fg.meta['decoder']}, {fg.meta['precision']}"
        print(f"real photos pool5, {out} ({how}) vs CPU (pil, fp32): {c.r[f'{out}_vs_cpu_fp32']}", flush=True)


def step_compiled(c: Context) -> None:
    ips, first, gflop = model_only(c.base, c.a.batch, c.iters, compile=True)
    c.r["model_only_compiled"] = {"images_per_s": round(ips), "first_call_s": round(first, 1)}
    print(
        f"model only {c.a.model} bf16 batch {c.a.batch}, torch.compile: {ips:.0f} images/s "
        f"({ips * gflop / 1000:.0f} TFLOP/s); first call {first:.0f} s",
        flush=True,
    )
    c.r.setdefault("warm", {})
    for mode in ("gpu", "hybrid"):
        c.r["warm"][f"{mode}_compile"] = e2e(c.base.replace(out=c.tmp / f"g_{mode}", decode=mode, compile=True))
        print(f"WARM end to end {mode}_compile: {c.r['warm'][f'{mode}_compile']}", flush=True)
    if (c.tmp / "a").exists():
        fa, fb = (load(c.tmp / d, "train") for d in ("a", "g_gpu"))
        c.r["compile_vs_eager_min_cosine"] = float(cosine(fa.X, fb.X).min())
        print(f"compiled vs eager features: min cosine {c.r['compile_vs_eager_min_cosine']:.6f}", flush=True)
    for d in ("g_gpu", "g_hybrid"):
        shutil.rmtree(c.tmp / d)


def step_sweep(c: Context) -> None:  # warm, eager: readers per mode, float16 storage
    c.r.setdefault("warm", {})
    hw = default_workers("hybrid", DEV)
    for label, cfg in (
        ("gpu_w12", c.base.replace(workers=12)),
        ("gpu_w16", c.base.replace(workers=16)),
        ("gpu_f16", c.base.replace(dtype="float16")),
        (f"hybrid_w{max(1, hw - 4)}", c.base.replace(decode="hybrid", workers=max(1, hw - 4))),
        (f"hybrid_w{hw + 2}", c.base.replace(decode="hybrid", workers=hw + 2)),
    ):
        c.r["warm"][label] = e2e(cfg.replace(out=c.tmp / "s"))
        print(f"WARM end to end {label}: {c.r['warm'][label]}", flush=True)
        shutil.rmtree(c.tmp / "s")


def step_threads(c: Context) -> None:  # compiled trunk, warm: how many threads preparing device batches pay, per mode
    c.fx.PREP_THREADS = 2
    run_extraction(c.base.replace(out=c.tmp / "tw", splits=("test",), compile=True))
    c.r.setdefault("warm", {})
    for mode in ("gpu", "hybrid"):
        for n in (1, 3):
            c.fx.PREP_THREADS = n
            label = f"{mode}_t{n}_compile"
            c.r["warm"][label] = e2e(c.base.replace(out=c.tmp / "t", decode=mode, compile=True))
            print(f"WARM end to end {label}: {c.r['warm'][label]}", flush=True)
            shutil.rmtree(c.tmp / "t")
    c.fx.PREP_THREADS = 2


def step_profile(c: Context) -> None:  # where a fresh CLI process spends the time around the loop: cold compiled run, then a no-op
    cmd = [*cli_args(c.base, c.tmp / "prof"), "--compile"]
    for label, pre in (("cold_cli_compile", []), ("noop_cli_profiled", ["-m", "cProfile", "-o", str(c.tmp / "p")])):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, *pre, *cmd], capture_output=True, text=True)
        c.r[label] = {"seconds": round(time.perf_counter() - t, 2), "rc": p.returncode}
        print(label, c.r[label], p.stdout[-600:], p.stderr[-600:], flush=True)
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(str(c.tmp / "p"), stream=buf).sort_stats("cumulative").print_stats(25)
    (c.a.out / "noop_profile.txt").write_text(buf.getvalue())
    print(buf.getvalue()[-4000:], flush=True)


def step_top(c: Context) -> None:  # fit-head --train-top on the device: one epoch over cached activations and views
    from flowerfeat.backbones import get_backbone
    from flowerfeat.config import FitConfig
    from flowerfeat.fit_top import fit_top

    cut = c.a.top_cut or next((k for k, v in get_backbone(c.a.model).cuts().items() if v.trainable), None)
    if cut is None:
        c.r["top"] = {"skipped": f"{c.a.model} has no cut below a trainable top"}
        return
    data = c.tmp / "top_photos"  # the first --top-images synthetic training files
    for f in sorted((c.root / "train").rglob("*.jpg"))[: c.a.top_images]:
        (data / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (data / "train" / f.parent.name / f.name).symlink_to(f)
    t = time.perf_counter()
    res = run_extraction(c.base.replace(data=data, out=c.tmp / "top", layer=cut, views=2))[0]
    c.r["top"] = {"cut": cut, "rows": res.rows, "extract_s": round(time.perf_counter() - t, 2)}
    cfg = FitConfig(features=res.path, train_top=True, epochs=2, device=DEV.type)
    result, _ = fit_top(cfg, log=lambda line: None)
    epochs = [e["seconds"] for e in result.history]  # the first includes cuDNN's autotuning
    c.r["top"].update(epoch_s=[round(e, 2) for e in epochs], rows_per_s=round(res.rows / epochs[-1]))
    print(f"fit-head --train-top at {cut} on {DEV.type}: {c.r['top']}", flush=True)
    shutil.rmtree(c.tmp / "top")


STEPS = {  # step name -> (function, optional: skipped past --budget)
    "cold": (step_cold, False),
    "warm": (step_warm, False),
    "parts": (step_parts, False),
    "agreement": (step_agreement, False),
    "real": (step_real, False),
    "top": (step_top, True),
    "compile": (step_compiled, True),
    "sweep": (step_sweep, True),
    "threads": (step_threads, True),
    "profile": (step_profile, True),
}


def run_step(c: Context, title: str, fn, t_start: float, optional: bool = False) -> None:
    """One step, timed; a failure is recorded and reported, and the others still run."""
    if optional and time.perf_counter() - t_start > c.a.budget:
        print(f"SKIPPED {title}: over the time budget", flush=True)
        return
    t = time.perf_counter()
    try:
        fn(c)
    except Exception as e:  # report and go on: one failing step must not cost the others
        c.r.setdefault("errors", {})[title] = repr(e)
        print(f"FAILED {title}: {e!r}", flush=True)
    print(f"[{title}: {time.perf_counter() - t:.1f} s]", flush=True)
    (c.a.out / "gpu_check.json").write_text(json.dumps(c.r, indent=1))


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    steps = set(a.steps.split(","))
    if not (a.photos and a.weights):
        steps.discard("real")
    t_start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    import torchvision

    name = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"
    r: dict = {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__}
    r["cpus"] = os.cpu_count()
    print(r, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base = ExtractConfig(data=tmp / "photos", out=tmp / "w", model=a.model, layer=a.layer, weights="none",
                         splits=("train",), batch_size=a.batch)  # fmt: skip
    c = Context(a, r, tmp, tmp / "photos", base, *((1, 512) if a.smoke else (20, 8192)))
    c.fx = reader
    run_step(c, "peak", step_peak, t_start)
    t = time.perf_counter()
    c.n_train, mean_bytes = synth(c.root, a.n, a.copies)
    r["synth"] = {"jpegs": a.n, "train_files": c.n_train, "mean_kb": round(mean_bytes / 1024, 1)}
    print(
        f"synthesised {a.n} JPEGs (mean {mean_bytes / 1024:.0f} KB) -> {c.n_train} train files "
        f"in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    for title, (fn, optional) in STEPS.items():
        if title in steps:
            run_step(c, title, fn, t_start, optional)
    (a.out / "gpu_check.json").write_text(json.dumps(r, indent=1))
    print("\nSUMMARY", json.dumps(r))
    shutil.rmtree(tmp, ignore_errors=True)
    return r


if __name__ == "__main__":
    main()
