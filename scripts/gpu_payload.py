"""What a lent GPU machine needs from ../shared, small enough to travel with the working tree (issue 34): the shared
test photos (550, copied) and the real weights in float16 (scripts/gpu_check.py's real step reads them back as
float32). The folder must stay out of git: add it to .git/info/exclude and name it in the device run's `carry`.

    python scripts/gpu_payload.py ../shared gpu_payload && echo /gpu_payload/ >> .git/info/exclude
    # device run, carry ["gpu_payload"]:  bash scripts/gpu_session.sh gpu_payload "$OUT"
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

WEIGHTS = ("vgg16_imagenet_features.pth", "tf_efficientnet_lite0_imagenet.pth")
LIMIT_MIB = 60  # the device tool carries at most 64 MiB of working tree in all


def half(src: Path, dst: Path) -> None:
    """``src``'s state dict with its floating tensors in float16, to ``dst``."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, dst)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", type=Path, help="the folder holding data/flower_photos and weights/")
    ap.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.out.exists():
        shutil.rmtree(a.out)
    shutil.copytree(a.shared / "data" / "flower_photos" / "test", a.out / "photos" / "test")
    (a.out / "weights").mkdir()
    for name in WEIGHTS:
        half(a.shared / "weights" / name, a.out / "weights" / name)
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    photos = sum(1 for f in (a.out / "photos").rglob("*") if f.is_file())
    print(f"{a.out}: {photos} photos and {len(WEIGHTS)} float16 weight files, {size / 2**20:.1f} MiB")
    if size > LIMIT_MIB * 2**20:
        raise SystemExit(f"{a.out} is over {LIMIT_MIB} MiB: it would not travel with the working tree")


if __name__ == "__main__":
    main()
