"""The layouts people have, scanned into splits that share the training split's class list: ``train/`` with ``val/``
(or ``valid/``, ``validation/``) and ``test/``; flat ``<class>/`` folders (a test split carved by --test-fraction);
a CSV of path,label rows with an optional split column (train, val, valid, test; or fastai's ``is_valid``).

A class missing from a validation or test split is allowed (it has no images there); a class found only there is
refused, since nothing could learn it.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import replace
from pathlib import Path

from flowerfeat.data import IMAGE_EXTENSIONS, Item, Split
from flowerfeat.errors import FlowerfeatError

# split -> the folder names that hold it (torchvision's and ImageNet's val/, Kaggle's and fastai's valid/)
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
UNDERSTOOD = "train/, val/ (or valid/, validation/) and test/"
# a CSV header's column names, by what they hold
PATH_COLUMNS = ("path", "file", "filename", "fname", "name", "image", "image_path", "filepath")
LABEL_COLUMNS = ("label", "class", "labels", "category")
SPLIT_COLUMNS = ("split", "is_valid", "subset", "set")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test"}  # fmt: skip


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini")


def list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name))


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) that identify a file's content; (-1, 0) for a file that cannot be read (a dangling symbolic
    link, a missing CSV row): it is kept, then skipped with its reason when decoded."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns


def scan_tree(root: Path, name: str, base: Path, known: tuple[str, ...] | None = None) -> Split:
    """The images under ``base``'s class folders, in a deterministic order (class, then path), with paths relative to
    ``root``. ``known``: the training split's classes, which label these images (a class may be missing here, none
    may be new)."""
    found = list_classes(base)
    if not found:
        raise FlowerfeatError(f"{base}: no class folders; put images in {base}/<class>/")
    if known is not None and set(found) - set(known):
        extra = ", ".join(sorted(set(found) - set(known)))
        raise FlowerfeatError(
            f"{base}: class folder(s) {extra} are not in the training split (nothing to learn them from); add them "
            f"to the training images or remove them from {base.name}/"
        )
    classes = tuple(known) if known is not None else tuple(found)
    items: list[Item] = []
    ignored: list[str] = []
    for cls in found:
        label, n_before = classes.index(cls), len(items)
        for dirpath, dirnames, filenames in os.walk(base / cls):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            rel_dir = Path(dirpath).relative_to(root).as_posix()  # string joins below: pathlib per file is slow
            for fname in sorted(filenames):
                rel = f"{rel_dir}/{fname}" if rel_dir != "." else fname
                if is_hidden(fname) or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(rel)
                    continue
                items.append(Item(rel, label, *_stat(os.path.join(dirpath, fname))))
        if len(items) == n_before and known is None:
            raise FlowerfeatError(
                f"{base / cls}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the "
                "folder"
            )
    return Split(name, root, classes, tuple(items), tuple(ignored))  # found is sorted: labels come in order


def missing_classes(split: Split) -> list[str]:
    """The classes with no image in ``split`` (allowed in a validation or test split)."""
    present = {it.label for it in split.items}
    return [c for i, c in enumerate(split.classes) if i not in present]


def scan_data(root: Path, splits: tuple[str, ...] = (), test_fraction: float = 0.0) -> dict[str, Split]:
    """The ``splits`` of ``root`` (default: every split it has), from a folder of split folders, flat class folders
    or a CSV; ``test_fraction`` carves a test split out of the training images of a data set without one."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _pick(_scan_csv(root), root, splits, test_fraction)
    if not root.is_dir():
        what = "is a file, not a data folder or a .csv" if root.exists() else "data folder not found"
        raise FlowerfeatError(
            f"{root}: {what}; run `flowerfeat download` or pass --data DIR (class folders under {UNDERSTOOD}, "
            "flat <class>/ folders, or a CSV)"
        )
    folders = split_folders(root)
    if folders:
        return _scan_folders(root, folders, splits, test_fraction)
    pool = replace(scan_tree(root, "all", root), layout="flat")
    return _pick({"all": pool}, root, splits, test_fraction)


def split_folders(root: Path) -> dict[str, Path]:
    """split -> its folder under ``root``, for the split folders present; two folders for one split are refused."""
    out = {}
    for split, names in SPLIT_FOLDERS.items():
        there = [root / n for n in names if (root / n).is_dir()]
        if len(there) > 1:
            raise FlowerfeatError(
                f"{root}: both {' and '.join(p.name + '/' for p in there)} hold the {split} split; keep one of them"
            )
        if there:
            out[split] = there[0]
    return out


def _scan_folders(root: Path, folders: dict[str, Path], splits, test_fraction: float) -> dict[str, Split]:
    found = ", ".join(f"{p.name}/" for p in folders.values())
    if "train" not in folders:
        raise FlowerfeatError(
            f"{root}: no train/ folder (found: {found}); the training images go in train/<class>/ (understood: "
            f"{UNDERSTOOD})"
        )
    train = scan_tree(root, "train", folders["train"])
    out = {"train": train}
    if test_fraction:
        if "test" in folders:
            raise FlowerfeatError(
                f"{root}: has its own test/ folder; drop --test-fraction (it carves a test split out of train/)"
            )
        out.update(carve(replace(train, name="all"), ("train", "test"), test_fraction))
    for name, folder in folders.items():
        if name != "train" and name not in out:
            out[name] = scan_tree(root, name, folder, known=train.classes)
    wanted = splits or tuple(n for n in SPLIT_FOLDERS if n in out)
    for name in wanted:
        if name not in out:
            hint = ("pass --split train to extract train/ alone, or --test-fraction 0.2 to carve a test split out of "
                    "it") if name == "test" else f"understood: {UNDERSTOOD}"  # fmt: skip
            raise FlowerfeatError(f"{root}: no {name} split (found: {found}); {hint}")
    return {name: out[name] for name in wanted}


def _pick(by_split: dict[str, Split], root: Path, splits, test_fraction: float) -> dict[str, Split]:
    """The ``splits`` of a flat folder or CSV: carved by ``test_fraction``, or all train, or by the split column."""
    if "all" not in by_split:  # a CSV with a split column
        if test_fraction:
            raise FlowerfeatError(f"{root}: has a split column; drop --test-fraction")
        wanted = splits or tuple(n for n in SPLIT_FOLDERS if n in by_split)
        missing = [s for s in wanted if s not in by_split]
        if missing:
            raise FlowerfeatError(
                f"{root}: no rows of split {missing[0]!r} (there are: {', '.join(by_split)}); pass --split with those"
            )
        return {s: by_split[s] for s in wanted}
    pool = by_split["all"]
    if test_fraction:
        return carve(pool, splits or ("train", "test"), test_fraction)
    if tuple(splits) == ("train",):
        return {"train": replace(pool, name="train")}
    what = "no split column" if pool.layout == "csv" else f"class folders at the top, no {UNDERSTOOD}"
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


# ---------------------------------------------------------------------------------------------------------
# CSV


def _is_header(row: list[str], base: Path) -> bool:
    """A header names the columns: its first cell is neither a file nor an image name (a missing image's row is
    data, kept and then skipped with its reason)."""
    return not row[0].lower().endswith(IMAGE_EXTENSIONS) and not (base / row[0]).exists()


def _columns(header: list[str] | None) -> tuple[int, int, int | None, bool]:
    """(path, label, split or None, the split column is fastai's is_valid) column indices: by the header's names
    where it has them, else the first three columns."""
    names = [c.lower() for c in header or []]

    def find(candidates):
        return next((names.index(c) for c in candidates if c in names), None)

    path, label, split = find(PATH_COLUMNS), find(LABEL_COLUMNS), find(SPLIT_COLUMNS)
    if path is None or label is None:
        return 0, 1, 2, False
    return path, label, split, split is not None and names[split] == "is_valid"


def _split_of(value: str, is_valid: bool, path: Path, row: int) -> str:
    if is_valid:
        return "val" if value.lower() in ("true", "1", "yes") else "train"
    split = SPLIT_VALUES.get(value.lower())
    if split is None:
        raise FlowerfeatError(f"{path}: row {row}: split {value!r} is not train, val (or valid) or test")
    return split


def _read_csv(path: Path) -> tuple[list[list[str]], list[str] | None]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FlowerfeatError(f"{path}: not a readable CSV ({e}); write one path,label row per image") from None
    if rows and _is_header(rows[0], path.parent):
        return rows[1:], rows[0]
    return rows, None


def _scan_csv(path: Path) -> dict[str, Split]:
    """Rows ``path,label[,split]`` of a CSV (by the header's column names where it has them), as one pool ("all")
    or by its split column (train/val/valid/test, or fastai's is_valid)."""
    rows, header = _read_csv(path)
    pc, lc, sc, is_valid = _columns(header)
    first = 2 if header else 1
    bad = next((k for k, r in enumerate(rows) if len(r) <= max(pc, lc) or not r[pc] or not r[lc]), None)
    if not rows or bad is not None:
        where = f"row {bad + first}" if rows else "no rows"
        raise FlowerfeatError(f"{path}: {where}: each row needs path,label (paths relative to the CSV)")
    with_split = sc is not None and all(len(r) > sc and r[sc] for r in rows)
    split_of = [_split_of(r[sc], is_valid, path, k + first) if with_split else "all" for k, r in enumerate(rows)]
    learn = [r[lc] for r, s in zip(rows, split_of) if s in ("all", "train")]
    if not learn:
        raise FlowerfeatError(f"{path}: no training rows; mark the training images' split column train")
    classes = tuple(sorted(set(learn)))
    only_elsewhere = sorted({r[lc] for r in rows} - set(classes))
    if only_elsewhere:
        raise FlowerfeatError(
            f"{path}: class(es) {', '.join(only_elsewhere)} have no training rows (nothing to learn them from); add "
            "training images of them or remove their rows"
        )
    groups: dict[str, list[Item]] = {}
    for r, split in zip(rows, split_of):
        groups.setdefault(split, []).append(Item(r[pc], classes.index(r[lc]), *_stat(str(path.parent / r[pc]))))
    return {
        name: Split(name, path.parent, classes, tuple(sorted(items, key=lambda it: (it.label, it.relpath))), (), "csv")
        for name, items in groups.items()
    }
