"""Scan and validate an ImageFolder split, decode images robustly, and serve (tensor, unit) pairs."""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass, replace
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
    layout: str = "folders"  # folders (train/ and test/), flat (<class>/ at the root) or csv
    test_fraction: float = 0.0  # > 0: the test split was carved out of the images by file name


def files_split(paths: list[Path], name: str = "files") -> Split:
    """Image files as a split of one unlabelled class, relative to their common folder: what the extraction's reader
    takes, for predict."""
    resolved = [Path(os.path.abspath(p)) for p in paths]  # links kept as links: a dangling one is named so
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    items = tuple(Item(p.relative_to(root).as_posix(), 0, -1, 0) for p in resolved)
    return Split(name, root, ("?",), items, ())


class BadImage(Exception):
    """An image file that cannot be used; the message is the reason recorded in the feature file."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini")


def list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) that identify a file's content; (-1, 0) for a file that cannot be read (a dangling symbolic
    link, a missing CSV row): it is kept, then skipped with its reason when decoded."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns


def scan_tree(root: Path, name: str, base: Path | None = None, classes: tuple[str, ...] | None = None) -> Split:
    """The images under ``base``'s class folders (default ``root/name``), in a deterministic order (class, then
    path), with paths relative to ``root``."""
    split_dir = base if base is not None else root / name
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
            for fname in sorted(filenames):
                rel = f"{rel_dir}/{fname}" if rel_dir != "." else fname
                if _is_hidden(fname) or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(rel)
                    continue
                items.append(Item(rel, label, *_stat(os.path.join(dirpath, fname))))
        if len(items) == n_before:
            raise FlowerfeatError(
                f"{cls_dir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
    return Split(name, root, tuple(found), tuple(items), tuple(ignored))


def scan_data(root: Path, splits: tuple[str, ...] = ("train", "test"), test_fraction: float = 0.0) -> dict[str, Split]:
    """The requested splits of ``root``, sharing one class list, from any of three layouts:

    - ``folders``: ``root/train/<class>/`` and ``root/test/<class>/`` (``test_fraction`` carves a test split out of
      ``train/`` when there is no ``test/``);
    - ``flat``: ``root/<class>/``, split into train and test by ``test_fraction``;
    - ``csv``: ``root`` is a CSV of ``path,label`` rows (paths relative to the CSV; a header row is optional; a third
      ``split`` column, train or test, assigns the rows instead of ``test_fraction``).
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _pick(_scan_csv(root), root, splits, test_fraction, "no split column")
    if not root.is_dir():
        what = "is a file, not a data folder or a .csv" if root.exists() else "data folder not found"
        raise FlowerfeatError(
            f"{root}: {what}; run `flowerfeat download` or pass --data DIR "
            "(an ImageFolder with train/<class>/ and test/<class>/)"
        )
    if (root / "train").is_dir() or (root / "test").is_dir():
        return _scan_folders(root, splits, test_fraction)
    pool = replace(scan_tree(root, "all", base=root), layout="flat")
    return _pick({"all": pool}, root, splits, test_fraction, "class folders at the top, no train/ and test/")


def _scan_folders(root: Path, splits: tuple[str, ...], test_fraction: float) -> dict[str, Split]:
    if test_fraction:
        if (root / "test").is_dir():
            raise FlowerfeatError(
                f"{root}: has its own test/ folder; drop --test-fraction (it carves a test split out of train/)"
            )
        return carve(scan_tree(root, "all", base=root / "train"), splits, test_fraction)
    out: dict[str, Split] = {}
    classes = None
    for name in splits:
        if not (root / name).is_dir():
            hint = (
                "pass --split train to extract train/ alone, or --test-fraction 0.2 to carve a test split out of it"
                if name == "test"
                else "the data folder needs train/<class>/ and test/<class>/ (or pass --data DIR)"
            )
            raise FlowerfeatError(f"{root / name}: no '{name}' folder; {hint}")
        out[name] = scan_tree(root, name, classes=classes)
        classes = out[name].classes
    return out


def _pick(by_split: dict[str, Split], root: Path, splits, test_fraction: float, what: str) -> dict[str, Split]:
    """The requested splits of a flat folder or CSV: carved by ``test_fraction``, or all train, or by split column."""
    if "all" not in by_split:  # a CSV with a split column
        if test_fraction:
            raise FlowerfeatError(f"{root}: has a split column; drop --test-fraction")
        missing = [s for s in splits if s not in by_split]
        if missing:
            raise FlowerfeatError(
                f"{root}: no rows of split {missing[0]!r}; pass --split with one of {sorted(by_split)}"
            )
        return {s: by_split[s] for s in splits}
    pool = by_split["all"]
    if test_fraction:
        return carve(pool, splits, test_fraction)
    if tuple(splits) == ("train",):
        return {"train": replace(pool, name="train")}
    raise FlowerfeatError(
        f"{root}: {what}; pass --test-fraction 0.2 to split the images into train and test, "
        "or --split train to use them all for training"
    )


def _name_rank(relpath: str) -> tuple[bytes, str]:
    """Where a file falls in its class's deterministic order: a hash of its name alone, so the split does not depend
    on the folder's location, the machine, or the other files' names."""
    name = relpath.rsplit("/", 1)[-1]
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest(), relpath


def held_out(relpaths: list[str], test_fraction: float) -> set[str]:
    """The one split rule (``--test-fraction`` and ``flowerfeat download``): of one class's files, the
    round(test_fraction x n) first by ``_name_rank`` go to test (stratified, repeatable; adding files moves few)."""
    ranked = sorted(relpaths, key=_name_rank)
    return set(ranked[: round(test_fraction * len(ranked))])


def stratified_order(split: Split, seed: int) -> list[int]:
    """Every item of ``split`` in an order whose every prefix is a stratified, seeded sample: within each class a
    seeded hash of the path ranks the images, and the classes interleave by their share (rank + 0.5) / size. So
    the first 500 of the order are also the first 500 of any larger sample (compare's samples, int8 calibration)."""

    def rank(relpath: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{relpath}".encode("utf-8", "surrogateescape")).digest()

    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(split.items):
        by_class.setdefault(item.label, []).append(i)
    keys = []
    for members in by_class.values():
        members.sort(key=lambda i: rank(split.items[i].relpath))
        keys += [((k + 0.5) / len(members), rank(split.items[i].relpath), i) for k, i in enumerate(members)]
    return [i for *_k, i in sorted(keys)]


def carve(pool: Split, splits, test_fraction: float) -> dict[str, Split]:
    """Split ``pool`` into train and test, class by class, by ``held_out``."""
    test: set[int] = set()
    for label in range(len(pool.classes)):
        members = [i for i, it in enumerate(pool.items) if it.label == label]
        chosen = held_out([pool.items[i].relpath for i in members], test_fraction)
        test.update(i for i in members if pool.items[i].relpath in chosen)
    parts = {
        "train": tuple(it for i, it in enumerate(pool.items) if i not in test),
        "test": tuple(it for i, it in enumerate(pool.items) if i in test),
    }
    unknown = [s for s in splits if s not in parts]
    if unknown:
        raise FlowerfeatError(f"--split {unknown[0]}: a split carved by --test-fraction is train or test")
    return {s: replace(pool, name=s, items=parts[s], test_fraction=test_fraction) for s in splits}


def _is_header(row: list[str], base: Path) -> bool:
    """A header names the columns: its first cell is neither a file nor an image name (a missing image's row is
    data, kept and then skipped with its reason)."""
    return not row[0].lower().endswith(IMAGE_EXTENSIONS) and not (base / row[0]).exists()


def _scan_csv(path: Path) -> dict[str, Split]:
    """Rows ``path,label[,split]`` of a CSV, as one pool ("all") or by its split column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FlowerfeatError(f"{path}: not a readable CSV ({e}); write one path,label row per image") from None
    base = path.parent
    first = 1
    if rows and _is_header(rows[0], base):
        rows, first = rows[1:], 2
    bad = next((k for k, r in enumerate(rows) if len(r) < 2 or not r[0] or not r[1]), None)
    if not rows or bad is not None:
        where = f"row {bad + first}" if rows else "no rows"
        raise FlowerfeatError(f"{path}: {where}: each row needs path,label (paths relative to the CSV)")
    with_split = all(len(r) > 2 and r[2] for r in rows)
    classes = tuple(sorted({r[1] for r in rows}))
    label = {c: i for i, c in enumerate(classes)}
    groups: dict[str, list[Item]] = {}
    for r in rows:
        item = Item(r[0], label[r[1]], *_stat(str(base / r[0])))
        groups.setdefault(r[2] if with_split else "all", []).append(item)
    return {
        name: Split(name, base, classes, tuple(sorted(items, key=lambda it: (it.label, it.relpath))), (), "csv")
        for name, items in groups.items()
    }


def load_image(path: Path) -> Image.Image:
    """Decode any image Pillow reads into RGB, EXIF orientation applied; raise BadImage with a reason otherwise."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadImage("file name is not valid UTF-8; rename the file") from None
    if not os.path.exists(path):
        raise BadImage("broken symbolic link" if os.path.islink(path) else "file not found")
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


class Augment:
    """Seeded RandomResizedCrop + horizontal flip on a PIL image (picklable for DataLoader workers)."""

    def __init__(self, crop_size, resize_size):
        self.crop_size, self.resize_size = list(crop_size), list(resize_size)  # the eval transform's

    def __call__(self, img, seed: int):
        import torch
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            i, j, h, w = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
        img = F.resized_crop(img, i, j, h, w, self.crop_size)
        # Brought to the eval transform's resize size, so its resize is a no-op and its centre crop keeps the
        # middle of the augmented view.
        img = F.resize(img, self.resize_size)
        return F.hflip(img) if flip else img


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
