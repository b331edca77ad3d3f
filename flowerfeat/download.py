"""Fetch TensorFlow's flower_photos archive, unpack it safely, and lay it out as a deterministic train/test ImageFolder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

from flowerfeat.errors import FlowerfeatError

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_BYTES = 228_813_984
TEST_FRACTION = 0.15  # about 550 of 3,670 images, close to the textbook's 540


def is_test(file_name: str, fraction: float = TEST_FRACTION) -> bool:
    """Deterministic split by a hash of the file name alone: independent of order, machine and Python's hash seed."""
    h = int.from_bytes(hashlib.sha256(file_name.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h / 2**64 < fraction


def fetch(url: str, dest: Path, expected_bytes: int | None, on_bytes: Callable[[int, int], None] = lambda d, t: None):
    """Download ``url`` to ``dest`` (via a temporary file), checking the size when one is expected."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or expected_bytes or 0)
            done = 0
            while block := r.read(1 << 20):
                f.write(block)
                done += len(block)
                on_bytes(done, total)
    except OSError as e:  # URLError, timeouts, refused connections: all "offline" to the user
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise FlowerfeatError(
            f"could not download {url} ({getattr(e, 'reason', e)}); offline, put an ImageFolder with "
            "train/<class>/ and test/<class>/ in place by hand and pass --data DIR"
        ) from None
    if expected_bytes is not None and done != expected_bytes:
        tmp.unlink()
        raise FlowerfeatError(
            f"{url}: got {done:,} bytes, expected {expected_bytes:,}; the download was cut short, retry"
        )
    os.replace(tmp, dest)


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a .tgz, refusing any member that would land outside ``target`` (absolute paths, '..', links)."""
    target = target.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                dest = (target / m.name).resolve()
                if not dest.is_relative_to(target) or m.issym() or m.islnk() or not (m.isfile() or m.isdir()):
                    raise FlowerfeatError(
                        f"{archive}: unsafe archive member {m.name!r} refused; the archive is not the flowers set"
                    )
            tar.extractall(target, members=members, filter="data")
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
        for f in sorted((extracted / cls).iterdir()):
            if not f.is_file():
                continue
            split = "test" if is_test(f.name, fraction) else "train"
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
    """Fetch, check, unpack and split the flowers set into ``out`` (atomically: ``out`` appears complete or not at all)."""
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
