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

from flowerfeat import backbone, store
from flowerfeat.bench import matmul_peak
from flowerfeat.config import ExtractConfig
from flowerfeat.extraction import run_extraction

GFLOP = {"fc7": 30.9, "pool5": 30.7}  # per 224x224 image (docs/benchmarks.md)
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


def model_only(layer: str, batch: int, iters: int = 20, compile: bool = False) -> tuple[float, float]:
    """(images/s, seconds of the first call, which includes compiling) for the trunk alone on random input."""
    trunk = backbone.build_trunk(backbone.resolve_weights("none"), layer).to(DEV).to(memory_format=torch.channels_last)
    if compile:
        trunk = torch.compile(trunk)
    x = torch.randn(batch, 3, 224, 224, device=DEV).contiguous(memory_format=torch.channels_last)
    t = time.perf_counter()
    backbone.trunk_rows(trunk, x, "bf16")
    sync()
    first = time.perf_counter() - t
    for _ in range(min(2, iters)):
        backbone.trunk_rows(trunk, x, "bf16")
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        backbone.trunk_rows(trunk, x, "bf16")
    sync()
    return iters * batch / (time.perf_counter() - t), first


def raw_dataset(root: Path, n: int | None = None, mode: str = "gpu"):
    """The dataset of the gpu (workers read bytes) or hybrid (workers decode) mode over the first ``n`` (default all)
    synthetic training files."""
    from flowerfeat.data import scan_data
    from flowerfeat.gpudecode import DecodedUnitDataset, RawUnitDataset

    split = scan_data(root, ("train",))["train"]
    split = dataclasses.replace(split, items=split.items[:n])
    return (DecodedUnitDataset if mode == "hybrid" else RawUnitDataset)(split, 0, backbone.build_transform(), None, 0)


def raw_batches(root: Path, batch: int, n: int = 4096, mode: str = "gpu"):
    from flowerfeat.gpudecode import collate_raw

    ds = raw_dataset(root, n, mode)
    return [collate_raw([ds[i] for i in range(s, min(s + batch, len(ds)))]) for s in range(0, len(ds), batch)]


def prep_rates(batches) -> dict:
    """images/s of the device-side preparation alone: nvjpeg decode only (JPEG batches), then the whole prepare() on 1
    and 2 threads (for decoded batches: pinning, the copy to the device, resize and normalisation)."""
    from flowerfeat.gpudecode import GpuPreprocess

    n = sum(len(b.units) for b in batches)
    pre = GpuPreprocess(DEV, backbone.build_transform())
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


def loader_rate(root: Path, batch: int, workers: int, mode: str = "gpu") -> float:
    """images/s of the DataLoader alone: workers read bytes and JPEG headers (gpu), or also decode (hybrid)."""
    from torch.utils.data import DataLoader

    from flowerfeat.gpudecode import collate_raw

    ds = raw_dataset(root, mode=mode)
    sampler = [list(range(i, min(i + batch, len(ds)))) for i in range(0, len(ds), batch)]
    t = time.perf_counter()
    n = sum(
        len(b.units)
        for b in DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_raw, prefetch_factor=4)
    )
    return n / (time.perf_counter() - t)


def cli_args(root: Path, out: Path) -> list[str]:
    """`python -m flowerfeat features` over the synthetic train split, as a user would type it (without python)."""
    return ["-m", "flowerfeat", "features", "--data", str(root), "--out", str(out), "--weights", "none",
            "--layer", "fc7", "--split", "train"]  # fmt: skip


def load(out: Path, split: str):
    """The split's features under an --out folder (one extraction each here: <out>/<layer>-<weights>/)."""
    return store.load_features(store.find_features(out, split))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--real-ref", type=int, default=20, help="test photos per class for the real photos' CPU reference")
    ap.add_argument("--budget", type=float, default=300, help="seconds after which optional steps are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script itself")
    ap.add_argument(
        "--steps",
        default="cold,warm,parts,agreement,real,compile",
        help="comma-separated steps: cold, warm, parts, agreement, real, compile, sweep, threads, profile",
    )
    a = ap.parse_args()
    steps = set(a.steps.split(","))
    iters, peak_n = (1, 512) if a.smoke else (20, 8192)
    t_start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    import torchvision

    import flowerfeat.extraction as fx

    name = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"
    r: dict = {
        "device": name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpus": os.cpu_count(),
    }
    print(r, flush=True)

    def step(title, fn, optional=False):
        if title not in steps and title != "peak":
            return
        if optional and time.perf_counter() - t_start > a.budget:
            print(f"SKIPPED {title}: over the time budget", flush=True)
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # report and go on: one failing step must not cost the others
            r.setdefault("errors", {})[title] = repr(e)
            print(f"FAILED {title}: {e!r}", flush=True)
        print(f"[{title}: {time.perf_counter() - t:.1f} s]", flush=True)
        (a.out / "gpu_check.json").write_text(json.dumps(r, indent=1))

    def peak():
        r["bf16_matmul_tflops"] = round(matmul_peak(torch.bfloat16, DEV, n=peak_n) / 1000)
        print(f"bf16 matmul peak: {r['bf16_matmul_tflops']} TFLOP/s", flush=True)

    step("peak", peak)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    root = tmp / "photos"
    t = time.perf_counter()
    n_train, mean_bytes = synth(root, a.n, a.copies)
    r["synth"] = {"jpegs": a.n, "train_files": n_train, "mean_kb": round(mean_bytes / 1024, 1)}
    print(
        f"synthesised {a.n} JPEGs (mean {mean_bytes / 1024:.0f} KB) -> {n_train} train files "
        f"in {time.perf_counter() - t:.0f} s",
        flush=True,
    )

    def cold():  # the CLI in a fresh process, as a user runs it: python start, imports, cuDNN tuning included
        cmd = [sys.executable, *cli_args(root, tmp / "cli"), "--batch-size", str(a.batch)]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t
        print(p.stdout[-800:], p.stderr[-800:], flush=True)
        r["cold_cli"] = {"seconds": round(dt, 2), "images_per_s": round(n_train / dt), "rc": p.returncode}
        print(f"cold_cli: {n_train} images, {dt:.1f} s", flush=True)
        t = time.perf_counter()
        code = (
            "import torch, flowerfeat.cli, flowerfeat.extraction; torch.cuda.is_available() and torch.zeros(1).cuda()"
        )
        subprocess.run([sys.executable, "-c", code])
        r["import_and_cuda_init_s"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(tmp / "cli")

    step("cold", cold)
    base = ExtractConfig(data=root, out=tmp / "w", layer="fc7", weights="none", splits=("train",), batch_size=a.batch)

    def warm():  # in this process, after one run has tuned cuDNN and started nvjpeg; default workers
        run_extraction(base.replace(out=tmp / "warmup", splits=("test",)))
        r["warm"] = {}
        for label, cfg in (
            ("gpu", base.replace(out=tmp / "a")),
            ("gpu_again", base.replace(out=tmp / "b")),
            ("hybrid", base.replace(out=tmp / "h", decode="hybrid")),
            ("hybrid_again", base.replace(out=tmp / "h2", decode="hybrid")),
        ):
            r["warm"][label] = e2e(cfg)
            print(f"WARM end to end {label}: {r['warm'][label]}", flush=True)
        fa, fb = (load(tmp / d, "train") for d in ("a", "b"))
        assert fa.paths == fb.paths
        r["repeat_max_abs_diff"] = float(np.abs(fa.X - fb.X).max())
        r["repeat_min_cosine"] = float(cosine(fa.X, fb.X).min())
        fh = load(tmp / "h", "train")
        r["hybrid_vs_gpu_min_cosine"] = float(cosine(fa.X, fh.X).min())
        print(
            f"two identical runs: max |diff| {r['repeat_max_abs_diff']:.3g}, min cosine {r['repeat_min_cosine']:.6f}; "
            f"hybrid vs gpu: min cosine {r['hybrid_vs_gpu_min_cosine']:.5f}",
            flush=True,
        )
        for d in ("b", "h2"):
            shutil.rmtree(tmp / d)

    step("warm", warm)

    def parts():
        for layer, batch in (("fc7", a.batch), ("pool5", a.batch)):
            ips, _ = model_only(layer, batch, iters)
            r[f"model_{layer}_b{batch}"] = round(ips)
            print(
                f"model only {layer} bf16 batch {batch}: {ips:.0f} images/s = {ips * GFLOP[layer] / 1000:.0f} TFLOP/s",
                flush=True,
            )
        r["loader_w8"] = round(loader_rate(root, a.batch, 8))
        print(f"loader only, 8 workers reading: {r['loader_w8']} images/s", flush=True)
        hw = fx.default_workers("hybrid", DEV)
        r[f"loader_hybrid_w{hw}"] = round(loader_rate(root, a.batch, hw, "hybrid"))
        print(f"loader only, {hw} workers decoding (hybrid): {r[f'loader_hybrid_w{hw}']} images/s", flush=True)
        r["prep"] = prep_rates(raw_batches(root, a.batch))
        print(f"GPU preparation alone, nvjpeg (images/s): {r['prep']}", flush=True)
        r["prep_hybrid"] = prep_rates(raw_batches(root, a.batch, mode="hybrid"))
        print(f"GPU preparation alone, decoded in the workers (images/s): {r['prep_hybrid']}", flush=True)

    step("parts", parts)

    def agreement():  # synthetic test split, odd files included, several batches: each path vs the CPU fp32 PIL path
        c = base.replace(out=tmp / "ac", splits=("test",), precision="fp32", decode="cpu", device="cpu")
        c = c.replace(batch_size=32, workers=4)
        run_extraction(c)
        fc = load(tmp / "ac", "test")
        for mode in ("gpu", "hybrid"):
            run_extraction(base.replace(out=tmp / f"ag_{mode}", splits=("test",), batch_size=64, decode=mode))
            fg = load(tmp / f"ag_{mode}", "test")
            assert fg.paths == fc.paths, f"{mode} and CPU paths kept different images"
            cos = cosine(fg.X, fc.X)
            res = r[f"agreement_synthetic_{mode}"] = {
                "images": len(cos),
                "mean": float(cos.mean()),
                "min": float(cos.min()),
            }
            for kind in KINDS:
                k = np.array([Path(p).name.startswith(kind) for p in fg.paths])
                res[f"min_{kind}"] = float(cos[k].min()) if k.any() else None
            print(f"agreement {mode} (bf16) vs CPU (fp32, PIL), synthetic: {res}", flush=True)

    step("agreement", agreement)

    def real():  # real photos and weights: both modes' features come back in --out; a CPU fp32 reference on a subset
        w = tmp / "w.pth"
        torch.save({k: v.float() for k, v in torch.load(a.weights, weights_only=True).items()}, w)
        cfg = ExtractConfig(data=a.photos, out=a.out, layer="pool5", weights=str(w), batch_size=a.batch)
        cfg = cfg.replace(dtype="float16", compression="gzip")
        for mode, out in (("gpu", "real"), ("hybrid", "real_hybrid")):
            t = time.perf_counter()
            res = run_extraction(cfg.replace(out=a.out / out, decode=mode))
            dt = time.perf_counter() - t
            rows = sum(x.rows for x in res)
            r[f"{out}_extract"] = {"rows": rows, "seconds": round(dt, 2), "images_per_s": round(rows / dt)}
            print(f"real photos pool5, {mode}: {r[f'{out}_extract']}", flush=True)
        sub = tmp / "real_subset"  # the first --real-ref test photos of each class, for the CPU fp32 PIL path
        for cls in sorted(d for d in (a.photos / "test").iterdir() if d.is_dir()):
            (sub / "test" / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[: a.real_ref]:
                (sub / "test" / cls.name / f.name).symlink_to(f.resolve())
        ref = cfg.replace(data=sub, out=tmp / "real_cpu", splits=("test",), precision="fp32", decode="cpu")
        run_extraction(ref.replace(device="cpu", batch_size=32, workers=4, dtype="float32", compression="none"))
        fc = load(tmp / "real_cpu", "test")
        for out in ("real", "real_hybrid"):
            fg = load(a.out / out, "test")
            rows = {p: i for i, p in enumerate(fg.paths)}
            cos = cosine(fg.X[[rows[p] for p in fc.paths]].astype(np.float32), fc.X)
            r[f"{out}_vs_cpu_fp32"] = {"images": len(cos), "mean": float(cos.mean()), "min": float(cos.min())}
            how = f"{fg.meta['decoder']}, {fg.meta['precision']}"
            print(f"real photos pool5, {out} ({how}) vs CPU (pil, fp32): {r[f'{out}_vs_cpu_fp32']}", flush=True)

    if a.photos and a.weights:
        step("real", real)

    def compiled():
        ips, first = model_only("fc7", a.batch, iters, compile=True)
        r["model_fc7_compiled"] = {"images_per_s": round(ips), "first_call_s": round(first, 1)}
        print(
            f"model only fc7 bf16 batch {a.batch}, torch.compile: {ips:.0f} images/s "
            f"({ips * GFLOP['fc7'] / 1000:.0f} TFLOP/s); first call {first:.0f} s",
            flush=True,
        )
        r.setdefault("warm", {})
        for mode in ("gpu", "hybrid"):
            r["warm"][f"{mode}_compile"] = e2e(base.replace(out=tmp / f"g_{mode}", decode=mode, compile=True))
            print(f"WARM end to end {mode}_compile: {r['warm'][f'{mode}_compile']}", flush=True)
        if (tmp / "a").exists():
            fa, fb = (load(tmp / d, "train") for d in ("a", "g_gpu"))
            r["compile_vs_eager_min_cosine"] = float(cosine(fa.X, fb.X).min())
            print(f"compiled vs eager features: min cosine {r['compile_vs_eager_min_cosine']:.6f}", flush=True)
        for d in ("g_gpu", "g_hybrid"):
            shutil.rmtree(tmp / d)

    step("compile", compiled, optional=True)

    def sweep():  # warm, eager: readers per mode, float16 storage
        r.setdefault("warm", {})
        hw = fx.default_workers("hybrid", DEV)
        for label, cfg in (
            ("gpu_w12", base.replace(workers=12)),
            ("gpu_w16", base.replace(workers=16)),
            ("gpu_f16", base.replace(dtype="float16")),
            (f"hybrid_w{max(1, hw - 4)}", base.replace(decode="hybrid", workers=max(1, hw - 4))),
            (f"hybrid_w{hw + 2}", base.replace(decode="hybrid", workers=hw + 2)),
        ):
            r["warm"][label] = e2e(cfg.replace(out=tmp / "s"))
            print(f"WARM end to end {label}: {r['warm'][label]}", flush=True)
            shutil.rmtree(tmp / "s")

    step("sweep", sweep, optional=True)

    def threads():  # compiled trunk, warm: how many threads preparing device batches pay, per mode
        fx.PREP_THREADS = 2
        run_extraction(base.replace(out=tmp / "tw", splits=("test",), compile=True))
        r.setdefault("warm", {})
        for mode in ("gpu", "hybrid"):
            for n in (1, 3):
                fx.PREP_THREADS = n
                label = f"{mode}_t{n}_compile"
                r["warm"][label] = e2e(base.replace(out=tmp / "t", decode=mode, compile=True))
                print(f"WARM end to end {label}: {r['warm'][label]}", flush=True)
                shutil.rmtree(tmp / "t")
        fx.PREP_THREADS = 2

    step("threads", threads, optional=True)

    def profile():  # where a fresh CLI process spends the time around the loop: cold compiled run, then a no-op
        cmd = [*cli_args(root, tmp / "prof"), "--compile"]
        for label, pre in (("cold_cli_compile", []), ("noop_cli_profiled", ["-m", "cProfile", "-o", str(tmp / "p")])):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, *pre, *cmd], capture_output=True, text=True)
            r[label] = {"seconds": round(time.perf_counter() - t, 2), "rc": p.returncode}
            print(label, r[label], p.stdout[-600:], p.stderr[-600:], flush=True)
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(str(tmp / "p"), stream=buf).sort_stats("cumulative").print_stats(25)
        (a.out / "noop_profile.txt").write_text(buf.getvalue())
        print(buf.getvalue()[-4000:], flush=True)

    step("profile", profile, optional=True)
    (a.out / "gpu_check.json").write_text(json.dumps(r, indent=1))
    print("\nSUMMARY", json.dumps(r))


if __name__ == "__main__":
    main()
