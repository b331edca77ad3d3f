"""Images: a split's files as items, decoded robustly (bad files skipped with their reason), served as (tensor, unit)
pairs; layouts.py finds the splits."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


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
    layout: str = "folders"  # folders (train/ and test/), flat (<class>/ at the root) or csv
    test_fraction: float = 0.0  # > 0: the test split was carved out of the images by file name


def files_split(paths: list[Path], name: str = "files") -> Split:
    """Image files as a split of one unlabelled class, relative to their common folder: what the extraction's reader
    takes, for predict."""
    resolved = [Path(os.path.abspath(p)) for p in paths]  # links kept as links: a dangling one is named so
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    items = tuple(Item(p.relative_to(root).as_posix(), 0, -1, 0) for p in resolved)
    return Split(name, root, ("?",), items, ())


_OPENING = threading.Lock()


class BadImage(Exception):
    """An image file that cannot be used; the message is the reason recorded in the feature file."""


def load_image(path: Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode any image Pillow reads into RGB, EXIF orientation applied; raise BadImage with a reason otherwise.
    With ``draft`` (width, height), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least
    that large (Pillow's ``draft``)."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadImage("file name is not valid UTF-8; rename the file") from None
    if not os.path.exists(path):
        raise BadImage("broken symbolic link" if os.path.islink(path) else "file not found")
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        # Pillow only warns between 1x and 2x its pixel limit; both are decompression bombs to us. The warnings
        # filter is the process's: reader threads open (read the header, where Pillow checks) one at a time.
        with _OPENING, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
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


_GLOBAL_RNG = threading.Lock()  # reader threads draw views from torch's global generator in turn


class Augment:
    """Seeded RandomResizedCrop + horizontal flip on a PIL image (picklable for DataLoader workers; safe in reader
    threads)."""

    def __init__(self, crop_size, resize_size, scale: float = 0.08):
        self.crop_size, self.resize_size = list(crop_size), list(resize_size)  # the eval transform's
        self.scale = scale  # the smallest share of the image a view crops

    def __call__(self, img, seed: int):
        import torch
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):  # one thread at a time seeds torch's generator
            torch.manual_seed(seed)
            i, j, h, w = RandomResizedCrop.get_params(img, scale=(self.scale, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
        img = F.resized_crop(img, i, j, h, w, self.crop_size)
        # Brought to the eval transform's resize size, so its resize is a no-op and its centre crop keeps the
        # middle of the augmented view.
        img = F.resize(img, self.resize_size)
        return F.hflip(img) if flip else img


class UnitDataset:
    """Map-style dataset over a split's units (image x view, see extraction.py); item ``u`` is (tensor or None, u,
    reason)."""

    draft: tuple[int, int] | None = None  # --decode draft: the size a JPEG keeps (load_image)

    def __init__(self, split: Split, n_views: int, transform, augment, seed: int):
        self.split, self.n_views = split, n_views
        self.transform, self.augment, self.seed = transform, augment, seed

    def __len__(self) -> int:
        return len(self.split.items) * (1 + self.n_views)

    def _draft(self, view: int) -> tuple[int, int] | None:
        """The draft size: an augmented view crops down to ``scale`` of the image, so it keeps 1/sqrt(scale) more."""
        if self.draft is None or not view:
            return self.draft
        k = 1 / math.sqrt(self.augment.scale)
        return math.ceil(self.draft[0] * k), math.ceil(self.draft[1] * k)

    def __getitem__(self, unit: int):
        item = self.split.items[unit // (1 + self.n_views)]
        view = unit % (1 + self.n_views)
        try:
            img = load_image(self.split.root / item.relpath, self._draft(view))
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
