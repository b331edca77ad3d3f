"""Fetch TensorFlow's flower_photos archive, unpack it safely, and lay it out as a deterministic train/test
ImageFolder."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

from flowerfeat.layouts import held_out
from flowerfeat.errors import FlowerfeatError

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_BYTES = 228_813_984
TEST_FRACTION = 0.15  # 550 of 3,670 images, close to the textbook's 540


def fetch(url: str, dest: Path, expected_bytes: int | None, on_bytes: Callable[[int, int], None] = lambda d, t: None):
    """Download ``url`` to ``dest`` (under a temporary name until complete), checking the size when one is expected."""
    from flowerfeat.store import atomic_path

    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or expected_bytes or 0)
                done = 0
                while block := r.read(1 << 20):
                    f.write(block)
                    done += len(block)
                    on_bytes(done, total)
        except OSError as e:  # URLError, timeouts, refused connections: all "offline" to the user
            raise FlowerfeatError(
                f"could not download {url} ({getattr(e, 'reason', e)}); offline, put an ImageFolder with "
                "train/<class>/ and test/<class>/ in place by hand and pass --data DIR"
            ) from None
        if expected_bytes is not None and done != expected_bytes:
            raise FlowerfeatError(
                f"{url}: got {done:,} bytes, expected {expected_bytes:,}; the download was cut short, retry"
            )


def _inside(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (nothing outside ``dest``, no links out, no devices), which would strip a leading '/'
    and extract the member anyway: an absolute name is refused too."""
    if member.name.startswith(("/", os.sep)):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a .tgz, refusing any member that would land outside ``target`` (absolute paths, '..', links out)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(target, filter=_inside)
    except tarfile.FilterError as e:
        raise FlowerfeatError(
            f"{archive}: unsafe archive member {e.tarinfo.name!r} refused; the archive is not the flowers set"
        ) from None
    except tarfile.TarError as e:
        raise FlowerfeatError(
            f"{archive}: not a readable .tgz ({e}); delete it and rerun `flowerfeat download`"
        ) from None


def layout(extracted: Path, out: Path, fraction: float = TEST_FRACTION) -> dict[str, int]:
    """Move ``extracted/<class>/*.jpg`` into ``out/{train,test}/<class>/``; returns images per split."""
    counts = {"train": 0, "test": 0}
    classes = sorted(d.name for d in extracted.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FlowerfeatError(f"{extracted}: archive holds no class folders")
    for cls in classes:
        files = sorted(f for f in (extracted / cls).iterdir() if f.is_file())
        test = held_out([f.name for f in files], fraction)
        for f in files:
            split = "test" if f.name in test else "train"
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            os.replace(f, out / split / cls / f.name)
            counts[split] += 1
    return counts


def download_flowers(
    out: Path,
    url: str = FLOWERS_URL,
    expected_bytes: int | None = FLOWERS_BYTES,
    on_bytes: Callable[[int, int], None] = lambda d, t: None,
) -> dict[str, int]:
    """Fetch, check, unpack and split the flowers set into ``out`` (atomically: ``out`` appears complete or not at
    all)."""
    out = Path(out)
    if out.exists():
        raise FlowerfeatError(f"{out}: already exists; delete it to download again, or use it with --data {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=out.parent))
    try:
        archive = work / "flower_photos.tgz"
        fetch(url, archive, expected_bytes, on_bytes)
        safe_extract(archive, work / "x")
        roots = [d for d in (work / "x").iterdir() if d.is_dir()]
        src = roots[0] if len(roots) == 1 else work / "x"
        staged = work / "staged"
        counts = layout(src, staged)
        os.replace(staged, out)
        return counts
    finally:
        shutil.rmtree(work, ignore_errors=True)
