"""GPU check (run by scripts/gpu_check.sh on a machine with CUDA and no internet).

Synthesises realistic JPEGs, then prints: the bf16 matmul peak, model-only images/s, GPU decode images/s,
end-to-end images/s of `flowerfeat features` (JPEG files -> finished HDF5), and the agreement of GPU-path
features (bf16, GPU decode) with the CPU-path fp32 features on the same images.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowerfeat import backbone, store
from flowerfeat.bench import matmul_peak
from flowerfeat.config import ExtractConfig
from flowerfeat.extract import run_extraction


def synth(root: Path, n: int) -> None:
    """n JPEGs of 320x240 to 500x375 in train/ (5 classes) and a few in test/, smooth content like photos."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(320, 240), (400, 300), (500, 375), (375, 500), (333, 500)]
    for i in range(n):
        split = "test" if i % 20 == 0 else "train"
        d = root / split / f"class{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(d / f"{i:06d}.jpg", quality=90)


def main(n: int, batch: int) -> None:
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"bf16 matmul peak: {matmul_peak(torch.bfloat16, dev, n=8192) / 1000:.0f} TFLOP/s")
    trunk = backbone.build_trunk(backbone.resolve_weights("none"), "fc7").to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            trunk(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            trunk(x)
        torch.cuda.synchronize()
    ips = 10 * batch / (time.perf_counter() - t)
    print(f"model only (fc7, bf16, batch {batch}): {ips:.0f} images/s = {ips * 30.9 / 1000:.0f} TFLOP/s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        t = time.perf_counter()
        synth(root, n)
        print(f"synthesised {n} JPEGs in {time.perf_counter() - t:.0f} s")
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        files = sorted(root.rglob("*.jpg"))[:2048]
        datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
        decode_jpeg(datas[:batch], mode=ImageReadMode.RGB, device=dev)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, len(datas), batch):
            imgs = decode_jpeg(datas[s : s + batch], mode=ImageReadMode.RGB, device=dev)
            [F.center_crop(F.resize(i, [256], antialias=True), [224]) for i in imgs]
        torch.cuda.synchronize()
        print(f"GPU decode + resize + crop: {len(datas) / (time.perf_counter() - t):.0f} images/s")

        for workers in (8, 12):
            out = Path(tmp) / f"features{workers}"
            cfg = ExtractConfig(
                data=root, out=out, layer="fc7", weights="none", batch_size=batch, workers=workers, splits=("train",)
            )
            t = time.perf_counter()
            res = run_extraction(cfg)[0]
            dt = time.perf_counter() - t
            print(
                f"end to end (JPEG files -> finished train.h5, {workers} workers): {res.rows} images in {dt:.1f} s = "
                f"{res.rows / dt:.0f} images/s (reads waited {res.read_s:.1f} s, compute {res.compute_s:.1f} s, "
                f"writes {res.write_s:.1f} s)"
            )

        # agreement: GPU path (bf16, GPU decode) vs CPU path (fp32, PIL) on the test split
        gpu_cfg = ExtractConfig(
            data=root, out=Path(tmp) / "g", layer="fc7", weights="none", splits=("test",), workers=4
        )
        cpu_cfg = gpu_cfg.replace(out=Path(tmp) / "c", precision="fp32", decode="cpu", device="cpu", batch_size=32)
        run_extraction(gpu_cfg)
        run_extraction(cpu_cfg)
        a = store.load_features(Path(tmp) / "g" / "test.h5").features
        b = store.load_features(Path(tmp) / "c" / "test.h5").features
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        print(
            f"GPU path vs CPU fp32 path features ({len(a)} images): mean cosine {cos.mean():.5f}, min {cos.min():.5f}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000, int(sys.argv[2]) if len(sys.argv) > 2 else 256)
