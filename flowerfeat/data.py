"""Scan and validate an ImageFolder split, decode images robustly, and serve (tensor, unit) pairs."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowerfeat.errors import FlowerfeatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Item:
    """One image file of a split: path relative to the data root, class index, and what identifies its content."""

    relpath: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Split:
    name: str
    root: Path  # the data root, so that root / item.relpath is the file
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    ignored: tuple[str, ...]  # non-image or hidden files that were passed over


class BadImage(Exception):
    """An image file that cannot be used; the message is the reason recorded in the feature file."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini")


def list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


def scan_split(root: Path, split: str, classes: tuple[str, ...] | None = None) -> Split:
    """List the images of ``root/split`` in a deterministic order (class, then path)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FlowerfeatError(
            f"{split_dir}: no '{split}' folder; the data folder needs train/<class>/ and test/<class>/ "
            "(run `flowerfeat download`, or pass --data DIR)"
        )
    found = list_classes(split_dir)
    if not found:
        raise FlowerfeatError(f"{split_dir}: no class folders; put images in {split_dir}/<class>/")
    if classes is not None and tuple(found) != tuple(classes):
        only_here = sorted(set(found) - set(classes))
        missing = sorted(set(classes) - set(found))
        raise FlowerfeatError(
            f"{split_dir}: classes differ from the other split (extra here: {only_here or 'none'}, "
            f"missing here: {missing or 'none'}); make both splits have the same class folders"
        )
    items: list[Item] = []
    ignored: list[str] = []
    for label, cls in enumerate(found):
        cls_dir = split_dir / cls
        n_before = len(items)
        for dirpath, dirnames, filenames in os.walk(cls_dir):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            rel_dir = Path(dirpath).relative_to(root).as_posix()  # string joins below: pathlib per file is slow
            for name in sorted(filenames):
                rel = f"{rel_dir}/{name}"
                if _is_hidden(name) or not name.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(rel)
                    continue
                st = os.stat(os.path.join(dirpath, name))
                items.append(Item(rel, label, st.st_size, st.st_mtime_ns))
        if len(items) == n_before:
            raise FlowerfeatError(
                f"{cls_dir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
    return Split(split, root, tuple(found), tuple(items), tuple(ignored))


def scan_data(root: Path, splits: tuple[str, ...] = ("train", "test")) -> dict[str, Split]:
    """Scan every split and check they share one class list."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a data folder" if root.exists() else "data folder not found"
        raise FlowerfeatError(
            f"{root}: {what}; run `flowerfeat download` or pass --data DIR "
            "(an ImageFolder with train/<class>/ and test/<class>/)"
        )
    out: dict[str, Split] = {}
    classes = None
    for name in splits:
        out[name] = scan_split(root, name, classes)
        classes = out[name].classes
    return out


def load_image(path: Path) -> Image.Image:
    """Decode any image Pillow reads into RGB, EXIF orientation applied; raise BadImage with a reason otherwise."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadImage("file name is not valid UTF-8; rename the file") from None
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; both are decompression bombs to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)  # first frame of animated GIF/WebP/TIFF
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadImage(f"corrupt or truncated image: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: Pillow's RGB conversion clips at 255 (an all-white image); scale instead.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else float(a.max())
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return im.convert("RGB")  # alpha dropped, as torchvision's own ImageFolder loader does


def view_seed(seed: int, relpath: str, view: int) -> int:
    """Seed of one augmented view: depends on the file, not its position, so cached rows stay valid."""
    h = hashlib.sha256(f"{seed}\0{relpath}\0{view}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class UnitDataset:
    """Map-style dataset over a split's units (image x view, see extraction.py); item ``u`` is (tensor or None, u,
    reason)."""

    def __init__(self, split: Split, n_views: int, transform, augment, seed: int):
        self.split, self.n_views = split, n_views
        self.transform, self.augment, self.seed = transform, augment, seed

    def __len__(self) -> int:
        return len(self.split.items) * (1 + self.n_views)

    def __getitem__(self, unit: int):
        item = self.split.items[unit // (1 + self.n_views)]
        view = unit % (1 + self.n_views)
        try:
            img = load_image(self.split.root / item.relpath)
        except BadImage as e:
            return None, unit, str(e)
        if view:
            img = self.augment(img, view_seed(self.seed, item.relpath, view))
        return self.transform(img), unit, ""


def collate_units(batch):
    """Stack the readable images; pass the unit ids and the skip reasons through."""
    import torch

    good = [(t, u) for t, u, _ in batch if t is not None]
    bad = [(u, r) for t, u, r in batch if t is None]
    x = torch.stack([t for t, _ in good]) if good else None
    return x, [u for _, u in good], bad
