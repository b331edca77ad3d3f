"""Where everything lives on disk, in one place: cache folders (one per data set and trunk), split files, work in
progress, engine files, heads, the LATEST pointer; locks and atomic writes.

    <out>/LATEST                                        the cache folder extracted last (relative to <out>)
    <out>/<data set>/dataset.json                       which --data this is (its resolved path)
    <out>/<data set>/<model>-<cut>-<weights tag>/       one folder per data set and trunk
        <split>.h5                                      finished feature files: train, val, test
        <split>.h5.partial/rank<r>of<w>/                work in progress, one shard log per torchrun rank
        heads/<name>.pt                                 the heads fitted on train.h5, one file per experiment
        trunk-int8.onnx, trunk-int8.json                the int8 trunk kept for this cache, and how it was made
        trunk-fp32.onnx, trunk-fp32.json                the trunk exported for ONNX Runtime, kept: no run exports twice
        speed.json                                      images/s of the run that extracted it (compare)
        .features-rank<r>of<w>.lock                     held while a run writes here

<data set> is the --data folder's (or CSV's) name and a short hash of its resolved path: flower_photos-1a2b3c4d.
Caches of flowerfeat 0.2 (<out>/<model>-<cut>-<weights tag>/ directly) and its heads (data/runs/*/head.pt) are
still found and read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import safe_name

LATEST = "LATEST"
DATASET_FILE = "dataset.json"
HEADS = "heads"
LEGACY_RUNS = Path("data/runs")  # where flowerfeat 0.2 saved heads: <cache folder name>/head.pt
LEGACY_HEAD = "head.pt"


def dataset_tag(data: Path) -> str:
    """A data set's part of a cache path: its folder's (or CSV's) name and a short hash of its resolved path, so two
    data sets never share a folder (``flower_photos-1a2b3c4d``)."""
    resolved = Path(data).resolve()
    name = resolved.stem if resolved.suffix.lower() == ".csv" else resolved.name
    return f"{safe_name(name) or 'data'}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def cache_dir(out: Path, data: Path, model_folder: str, layer: str, weights_tag: str) -> Path:
    """``<out>/<data set>/<model>-<cut>-<weights tag>``, e.g. ``data/features/flowers-1a2b3c4d/vgg16-fc7-imagenet``."""
    return Path(out) / dataset_tag(data) / f"{model_folder}-{layer}-{weights_tag}"


def mark_dataset(folder: Path, data: Path) -> None:
    """Record beside a data set's caches which --data they are of (read by `flowerfeat runs`)."""
    path = Path(folder).parent / DATASET_FILE
    if not path.is_file():
        write_text(path, json.dumps({"data": str(Path(data).resolve())}) + "\n")


def dataset_of(folder: Path) -> str | None:
    """The --data a cache folder was extracted from (None: not recorded, as in 0.2's layout)."""
    try:
        return json.loads((Path(folder).parent / DATASET_FILE).read_text())["data"]
    except (OSError, ValueError, KeyError):
        return None


def split_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.h5"


def split_files(folder: Path) -> list[Path]:
    """The feature files in a cache folder, by name."""
    return sorted(Path(folder).glob("*.h5"))


def sibling_split(feature_file: Path, split: str) -> Path:
    """The ``split`` file beside ``feature_file`` (a head's test file beside its training file)."""
    return Path(feature_file).with_name(f"{split}.h5")


def partial_dir(final: Path) -> Path:
    """Where a split's work in progress goes until its file is finished."""
    return final.with_name(final.name + ".partial")


def shard_dir(final: Path, rank: int, world: int) -> Path:
    return partial_dir(final) / f"rank{rank}of{world}"


@dataclass(frozen=True)
class EngineFiles:
    """An engine file kept in a cache folder, and the record of how it was made: {"settings", "sha256", ...}."""

    model: Path
    record: Path

    def read_record(self) -> dict | None:
        """How the kept file was made (None: no record, or an unreadable one)."""
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None

    def intact(self, settings: dict) -> str | None:
        """The kept file's sha256 when it was made with ``settings`` and is whole; else None (missing, cut short,
        changed, or made otherwise: to be made again)."""
        from flowerfeat.weights import sha256_file

        made = self.read_record()
        if made is None or made.get("settings") != settings or not self.model.is_file():
            return None
        return made["sha256"] if sha256_file(self.model) == made.get("sha256") else None

    def write_record(self, settings: dict, **more) -> str:
        """Record how the file now at ``model`` was made; returns its sha256."""
        from flowerfeat.weights import sha256_file

        sha = sha256_file(self.model)
        with atomic_path(self.record) as tmp:
            tmp.write_text(json.dumps({"settings": settings, **more, "sha256": sha}, indent=1) + "\n")
        return sha


def engine_files(folder: Path, precision: str) -> EngineFiles:
    """The engine file kept for the cache in ``folder``: the int8 trunk, or the fp32 ONNX export."""
    return EngineFiles(Path(folder) / f"trunk-{precision}.onnx", Path(folder) / f"trunk-{precision}.json")


def speed_file(feature_file: Path) -> Path:
    """Where `compare` keeps the images/s of the run that extracted ``feature_file``'s folder."""
    return Path(feature_file).with_name("speed.json")


def other_copies(folder: Path, split: str) -> list[Path]:
    """The ``split`` files of the same trunk for the other data sets under the same root (and in 0.2's layout): where
    the rows of a data set moved, renamed or copied are found again."""
    out, trunk = Path(folder).parent.parent, Path(folder).name
    places = [out / trunk, *(d / trunk for d in sorted(out.iterdir()) if d.is_dir())] if out.is_dir() else []
    return [p / f"{split}.h5" for p in places if p != Path(folder) and (p / f"{split}.h5").is_file()]


def mark_latest(out: Path, folder: Path) -> None:
    write_text(Path(out) / LATEST, Path(folder).relative_to(out).as_posix() + "\n")


def cache_folders(root: Path) -> list[Path]:
    """Every cache folder under the root of the caches (a folder holding feature files): ``<data set>/<trunk>/``,
    and 0.2's ``<trunk>/``; ``root`` itself when it is one."""
    root = Path(root)
    if not root.is_dir():
        return []
    if split_files(root):
        return [root]
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        found += [d] if split_files(d) else sorted(t for t in d.iterdir() if t.is_dir() and split_files(t))
    return found


def find_features(path: Path, split: str, layer: str | None = None, model: str | None = None) -> Path:
    """The ``split`` feature file ``path`` designates: a file as given; else, of the cache folders under ``path`` (the
    root of the caches, one data set's folder, or one cache folder), the one of ``model`` and ``layer`` when given,
    the one extracted last when several."""
    from flowerfeat.store.features import read_meta

    path = Path(path)
    if path.suffix == ".h5" or path.is_file():
        return path
    name = f"{split}.h5"
    folders = [d for d in cache_folders(path) if (d / name).is_file()]
    if not folders:
        raise FlowerfeatError(f"{path}: no {name} here; run `flowerfeat features` first (or pass --features FILE)")
    kept = [d for d in folders if _is_of(read_meta, d / name, layer, model)]
    if not kept:
        asked = " ".join(f"--{k} {v}" for k, v in (("model", model), ("layer", layer)) if v)
        there = ", ".join(_shown(d, path) for d in folders)
        raise FlowerfeatError(
            f"{path}: no features for {asked} (there are: {there}); run `flowerfeat features {asked}`, or pick one "
            "of those"
        )
    latest = (path / LATEST).read_text().strip() if (path / LATEST).is_file() else ""
    newest = max(kept, key=lambda d: (d / name).stat().st_mtime_ns)
    chosen = path / latest if latest and path / latest in kept else newest
    return chosen / name


def _shown(folder: Path, root: Path) -> str:
    return folder.relative_to(root).as_posix() if folder != root else folder.name


def _is_of(read_meta, file: Path, layer: str | None, model: str | None) -> bool:
    """Whether the feature file was cut at ``layer`` of ``model`` (either None: any); unreadable files are not."""
    if layer is None and model is None:
        return True
    try:
        meta = read_meta(file)
    except FlowerfeatError:
        return False
    return layer in (None, meta.get("layer")) and model in (None, meta.get("model"))


def head_path(features_file: Path, name: str) -> Path:
    """Where a head called ``name`` fitted on ``features_file`` is saved: beside it, in ``heads/``."""
    return Path(features_file).parent / HEADS / f"{name}.pt"


def heads_under(path: Path) -> list[Path]:
    """Every head checkpoint under ``path`` (a cache folder, a data set's folder or the root of the caches, or 0.2's
    data/runs), newest first."""
    path = Path(path)
    found = [h for pattern in (f"{HEADS}/*.pt", f"*/{HEADS}/*.pt", f"*/*/{HEADS}/*.pt", LEGACY_HEAD,
                               f"*/{LEGACY_HEAD}") for h in path.glob(pattern)]  # fmt: skip
    return sorted(set(found), key=lambda h: h.stat().st_mtime_ns, reverse=True)


def find_head(path: Path, layer: str | None = None, model: str | None = None) -> Path:
    """The head checkpoint ``path`` designates: a file as given; under a folder (the root of the caches by default),
    the head saved last (of ``model`` and ``layer``, when given)."""
    from flowerfeat.store.checkpoints import read_checkpoint_meta

    path = Path(path)
    if path.suffix == ".pt" or path.is_file():
        return path
    heads = heads_under(path)
    if not heads:
        old = f"; heads of flowerfeat 0.2 are in {LEGACY_RUNS}: pass --head FILE" if heads_under(LEGACY_RUNS) else ""
        raise FlowerfeatError(f"{path}: no head here; run `flowerfeat fit-head` first (or pass --head FILE){old}")
    if layer is None and model is None:
        return heads[0]
    records = {h: read_checkpoint_meta(h)["features"] for h in heads}
    kept = [h for h in heads if layer in (None, records[h]["layer"]) and model in (None, records[h]["model"])]
    if not kept:
        asked = " ".join(f"--{k} {v}" for k, v in (("model", model), ("layer", layer)) if v)
        there = ", ".join(sorted({f"{r['model']} {r['layer']}" for r in records.values()}))
        raise FlowerfeatError(
            f"{path}: no head fitted on features of {asked} (there are heads on: {there}); run `flowerfeat fit-head "
            f"{asked}`"
        )
    return kept[0]


# ---------------------------------------------------------------------------------------------------------
# Locks and atomic writes


@contextlib.contextmanager
def exclusive_lock(folder: Path, name: str):
    """Hold an flock on ``folder/.<name>.lock``; a second holder is refused at once (the OS frees it on kill -9)."""
    path = Path(folder) / f".{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlowerfeatError(
                f"{folder}: another flowerfeat run is writing here (lock {path.name} is held); "
                "wait for it to finish or use another --out"
            ) from None
        yield
    finally:
        os.close(fd)


def check_writable(out_dir: Path) -> None:
    """Refuse an output folder that cannot be made or written, without making it (a later error must not leave
    an empty folder behind)."""
    existing = Path(out_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = "a file is in the way" if not existing.is_dir() else "permission denied"
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise FlowerfeatError(f"{out_dir}: output folder is not writable ({why}); pass --out DIR you can write")


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary name beside ``path``; once written, it is fsynced and renamed over ``path`` in one step,
    so readers see the old file or the finished new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # same suffix: some writers check it
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def discard_unused(folders: list[Path]) -> None:
    """Remove the cache folders a run made (innermost last in ``folders``) while they hold nothing but its lock and
    the data set's record: a refused run leaves nothing behind."""
    for folder in reversed(folders):
        if folder.is_dir() and all(p.name.endswith(".lock") or p.name == DATASET_FILE for p in folder.iterdir()):
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()


def user_cache(name: str) -> Path:
    """A file of flowerfeat's in the user's cache folder ($XDG_CACHE_HOME, else ~/.cache): what `models` computed."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowerfeat" / name


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
