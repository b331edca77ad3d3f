"""Where everything lives on disk, in one place: cache folders, split files, work in progress, engine files, the
LATEST pointer, heads; locks and atomic writes.

    <out>/LATEST                                  the cache folder extracted last
    <out>/<model>-<cut>-<weights tag>/            one folder per trunk
        <split>.h5                                finished feature files
        <split>.h5.partial/rank<r>of<w>/          work in progress, one shard log per torchrun rank
        trunk-int8.onnx, trunk-int8.json          the int8 trunk kept for this cache, and how it was made
        speed.json                                images/s of the run that extracted it (compare)
        .features-rank<r>of<w>.lock               held while a run writes here
    data/runs/<cache folder name>/head.pt         the head fitted on that folder's train.h5
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from flowerfeat.config import RUNS_DIR
from flowerfeat.errors import FlowerfeatError

LATEST = "LATEST"
HEAD_FILE = "head.pt"


def cache_dir(out: Path, model_folder: str, layer: str, weights_tag: str) -> Path:
    """``<out>/<model>-<cut>-<weights tag>``, e.g. ``data/features/vgg16-pool5-gap-imagenet``."""
    return Path(out) / f"{model_folder}-{layer}-{weights_tag}"


def split_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.h5"


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
    """An engine file kept in a cache folder, and the record of how it was made."""

    model: Path
    record: Path


def engine_files(folder: Path, precision: str) -> EngineFiles:
    """The int8 trunk kept for the cache in ``folder``."""
    return EngineFiles(Path(folder) / f"trunk-{precision}.onnx", Path(folder) / f"trunk-{precision}.json")


def speed_file(feature_file: Path) -> Path:
    """Where `compare` keeps the images/s of the run that extracted ``feature_file``'s folder."""
    return Path(feature_file).with_name("speed.json")


def mark_latest(out: Path, folder: Path) -> None:
    write_text(Path(out) / LATEST, Path(folder).name + "\n")


def find_features(path: Path, split: str, layer: str | None = None, model: str | None = None) -> Path:
    """The ``split`` feature file ``path`` designates: a file as given; under the root of the caches (``--out`` of
    ``features``), the folder of ``model`` and ``layer`` when given, the one extracted last when several; else
    ``path/<split>.h5`` (one cache folder)."""
    from flowerfeat.store.features import read_meta

    path = Path(path)
    if path.suffix == ".h5" or path.is_file():
        return path
    name = f"{split}.h5"
    folders = sorted(d for d in path.iterdir() if (d / name).is_file()) if path.is_dir() else []
    if not folders and (path / name).is_file():
        folders = [path]
    if not folders:
        raise FlowerfeatError(f"{path}: no {name} here; run `flowerfeat features` first (or pass --features FILE)")
    kept = [d for d in folders if _is_of(read_meta, d / name, layer, model)]
    if not kept:
        asked = " ".join(f"--{k} {v}" for k, v in (("model", model), ("layer", layer)) if v)
        raise FlowerfeatError(
            f"{path}: no features for {asked} (there are: {', '.join(d.name for d in folders)}); "
            f"run `flowerfeat features {asked}`, or pick one of those"
        )
    latest = (path / LATEST).read_text().strip() if (path / LATEST).is_file() else ""
    by_name = {d.name: d for d in kept}
    return (by_name.get(latest) or max(kept, key=lambda d: (d / name).stat().st_mtime_ns)) / name


def _is_of(read_meta, file: Path, layer: str | None, model: str | None) -> bool:
    """Whether the feature file was cut at ``layer`` of ``model`` (either None: any); unreadable files are not."""
    if layer is None and model is None:
        return True
    try:
        meta = read_meta(file)
    except FlowerfeatError:
        return False
    return layer in (None, meta.get("layer")) and model in (None, meta.get("model"))


def default_head_path(features_file: Path) -> Path:
    """Where fit-head saves a head by default: beside its siblings of other models and layers, by the features'
    folder."""
    return RUNS_DIR / Path(features_file).resolve().parent.name / HEAD_FILE


def find_head(path: Path, layer: str | None = None, model: str | None = None) -> Path:
    """The head checkpoint ``path`` designates: a file as given; a folder's ``head.pt``; under the root of the runs
    (``data/runs``), the head saved last (of ``model`` and ``layer``, when given)."""
    from flowerfeat.store.checkpoints import read_checkpoint_meta

    path = Path(path)
    if path.suffix == ".pt" or path.is_file():
        return path
    heads = sorted(path.glob(f"*/{HEAD_FILE}")) + ([path / HEAD_FILE] if (path / HEAD_FILE).is_file() else [])
    if not heads:
        raise FlowerfeatError(f"{path}: no {HEAD_FILE} here; run `flowerfeat fit-head` first (or pass --head FILE)")
    if layer is None and model is None:
        return max(heads, key=lambda h: h.stat().st_mtime_ns)
    records = {h: read_checkpoint_meta(h)["features"] for h in heads}
    kept = [h for h in heads if layer in (None, records[h]["layer"]) and model in (None, records[h]["model"])]
    if not kept:
        asked = " ".join(f"--{k} {v}" for k, v in (("model", model), ("layer", layer)) if v)
        there = ", ".join(h.parent.name for h in heads)
        raise FlowerfeatError(
            f"{path}: no head fitted on features of {asked} (there are: {there}); run `flowerfeat fit-head {asked}`"
        )
    return max(kept, key=lambda h: h.stat().st_mtime_ns)


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


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
