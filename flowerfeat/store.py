"""The feature file: HDF5 schema in one place, a crash-safe append log for work in progress, atomic finish, reader.

A split is extracted into ``<split>.h5.partial/`` (append-only binary rows + a progress file that is replaced
atomically after the rows it counts are fsynced), and only when every row is there is ``<split>.h5`` written
under a temporary name and renamed into place. So a ``<split>.h5`` always is a finished file, and a killed run
resumes from its last committed batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerfeat import FORMAT_VERSION
from flowerfeat.errors import FlowerfeatError

@dataclass(frozen=True)
class Attr:
    """One attribute of a finished feature file, and which derived lists it belongs to."""

    name: str
    key: bool = False  # decides the feature values: part of the model key (a change invalidates every row)
    settings: bool = False  # how the split was made and stored: in the fingerprint beside the model key
    head: bool = False  # recorded in a head fitted on the file
    checked: bool = False  # a head and a feature file must agree on it (report, predict)
    json: bool = False  # stored as a JSON string


# The schema of a feature file's attributes, in one place: every list below is derived from it, and a test fails if
# a written attribute is missing here.
SCHEMA = (
    Attr("format_version", key=True),
    Attr("split"),
    Attr("model", key=True, head=True, checked=True),  # vgg16, resnet50, timm:tf_efficientnet_lite0, ...
    Attr("layer", key=True, head=True, checked=True),  # the model's cut
    Attr("feature_dim", key=True, head=True, checked=True),
    Attr("cut_dropout", head=True),  # the dropout the model's own classifier applies at the cut
    Attr("weights", key=True, head=True, checked=True),
    Attr("weights_sha256", head=True),
    Attr("weights_path", head=True),  # where the weights file was, so predict and export find it again
    Attr("preprocessing", key=True, head=True, checked=True, json=True),
    Attr("decoder", key=True, head=True, checked=True),
    Attr("precision", key=True, head=True, checked=True),
    Attr("engine", key=True, head=True, checked=True),
    # int8 only (else null): how the trunk was quantized (quantize.Settings), and the quantized model kept beside the
    # files ({path, sha256}), so predict runs the very same one
    Attr("quantization", key=True, head=True, checked=True, json=True),
    Attr("quantized_model", head=True, json=True),
    Attr("dtype", key=True, head=True, checked=True),
    Attr("classes", settings=True, head=True, checked=True),
    Attr("compression", settings=True),
    Attr("views", settings=True, head=True),
    Attr("view_seed", settings=True),
    Attr("layout", settings=True),  # folders, flat or csv
    Attr("test_fraction", settings=True),
    Attr("data_root"),
    Attr("library_versions", json=True),
    Attr("extract_config", json=True),
    Attr("model_key", head=True),
    Attr("fingerprint", head=True),
    Attr("created"),
    Attr("complete"),  # written last: a file without it was never finished
)
ATTRS = {a.name: a for a in SCHEMA}
MODEL_KEY_FIELDS = tuple(a.name for a in SCHEMA if a.key)
SETTINGS_FIELDS = tuple(a.name for a in SCHEMA if a.settings)
HEAD_FIELDS = tuple(a.name for a in SCHEMA if a.head)
CHECKED_FIELDS = tuple(a.name for a in SCHEMA if a.checked)
# Datasets of a finished file (all length N = rows, except `skipped`, which is (S, 2): path, reason).
DATASETS = ("features", "labels", "paths", "views", "file_sizes", "file_mtimes_ns", "skipped")


def engine_of(meta: dict) -> str:
    """The engine that made a feature file (or a head's features)."""
    return meta.get("engine") or "torch"


def model_key(meta: dict) -> str:
    blob = json.dumps({k: meta.get(k) for k in MODEL_KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(meta: dict, image_list: list[tuple]) -> str:
    """Hash of the model key, the settings fields (views and their seed, classes, storage filter, how the split was
    made) and every (relpath, label, size, mtime_ns). A new filter rewrites the file from the cached rows."""
    h = hashlib.sha256(model_key(meta).encode())
    h.update(json.dumps([meta.get(k) for k in SETTINGS_FIELDS]).encode())
    for entry in image_list:
        h.update(json.dumps(entry).encode())
    return h.hexdigest()


def describe_difference(old: dict, new: dict) -> str:
    """Name the fields that differ between two feature metadata dicts."""
    keys = [k for k in (*MODEL_KEY_FIELDS, *SETTINGS_FIELDS) if old.get(k) != new.get(k)]
    parts = []
    for k in keys:
        a, b = str(old.get(k)), str(new.get(k))
        parts.append(f"{k} {a[:60]} -> {b[:60]}" if len(a) + len(b) < 90 else f"{k} changed")
    return "; ".join(parts) or "image list changed"


# ---------------------------------------------------------------------------------------------------------
# Where the files live: <out>/<model>-<cut>-<weights tag>/<split>.h5, one folder per trunk, so switching --model,
# --layer or --weights keeps the other caches (and the heads fitted on them); <out>/LATEST names the folder
# extracted last.

LATEST = "LATEST"


def cache_dir(out: Path, model_folder: str, layer: str, weights_tag: str) -> Path:
    """``<out>/<model>-<cut>-<weights tag>``, e.g. ``data/features/vgg16-pool5-gap-imagenet``."""
    return Path(out) / f"{model_folder}-{layer}-{weights_tag}"


def mark_latest(out: Path, folder: Path) -> None:
    _atomic_write_text(Path(out) / LATEST, Path(folder).name + "\n")


def find_features(path: Path, split: str, layer: str | None = None, model: str | None = None) -> Path:
    """The ``split`` feature file ``path`` designates: a file as given; under the root of the caches (``--out`` of
    ``features``), the folder of ``model`` and ``layer`` when given, the one extracted last when several; else
    ``path/<split>.h5`` (one cache folder)."""
    path = Path(path)
    if path.suffix == ".h5" or path.is_file():
        return path
    name = f"{split}.h5"
    folders = sorted(d for d in path.iterdir() if (d / name).is_file()) if path.is_dir() else []
    if not folders and (path / name).is_file():
        folders = [path]
    if not folders:
        raise FlowerfeatError(f"{path}: no {name} here; run `flowerfeat features` first (or pass --features FILE)")
    kept = [d for d in folders if _is_of(d / name, layer, model)]
    if not kept:
        asked = " ".join(f"--{k} {v}" for k, v in (("model", model), ("layer", layer)) if v)
        raise FlowerfeatError(
            f"{path}: no features for {asked} (there are: {', '.join(d.name for d in folders)}); "
            f"run `flowerfeat features {asked}`, or pick one of those"
        )
    latest = (path / LATEST).read_text().strip() if (path / LATEST).is_file() else ""
    by_name = {d.name: d for d in kept}
    return (by_name.get(latest) or max(kept, key=lambda d: (d / name).stat().st_mtime_ns)) / name


def _is_of(file: Path, layer: str | None, model: str | None) -> bool:
    """Whether the feature file was cut at ``layer`` of ``model`` (either None: any); unreadable files are not."""
    if layer is None and model is None:
        return True
    try:
        meta = read_meta(file)
    except FlowerfeatError:
        return False
    return layer in (None, meta.get("layer")) and model in (None, meta.get("model"))


# ---------------------------------------------------------------------------------------------------------
# Locking


@contextlib.contextmanager
def exclusive_lock(out_dir: Path, name: str):
    """Hold an flock on ``out_dir/.<name>.lock``; a second holder is refused at once (the OS frees it on kill -9)."""
    path = out_dir / f".{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlowerfeatError(
                f"{out_dir}: another flowerfeat run is writing here (lock {path.name} is held); "
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


# ---------------------------------------------------------------------------------------------------------
# Work in progress


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class ShardLog:
    """Append-only log of finished batches for one (split, rank): rows, unit ids and skipped units.

    ``progress.json`` is replaced atomically only after the bytes it counts are fsynced; on reopen the data
    files are truncated back to it, so whatever was cut mid-write is dropped and redone.
    """

    def __init__(self, folder: Path, header: dict):
        self.folder = folder
        self.header = header
        self.dim = int(header["feature_dim"])
        self.dtype = np.dtype(header["dtype"])
        self.discarded = ""
        head_path = folder / "header.json"
        if folder.exists():
            try:
                old = json.loads(head_path.read_text())
                progress = json.loads((folder / "progress.json").read_text())
            except (OSError, ValueError):
                old, progress = None, None
            if old != header:
                self.discarded = "partial work from another configuration" if old else "unreadable partial work"
                shutil.rmtree(folder)
            else:
                self.batches, self.rows, self.n_skipped = progress["batches"], progress["rows"], progress["skipped"]
                self._truncate()
        if not folder.exists():
            folder.mkdir(parents=True)
            self.batches = self.rows = self.n_skipped = 0
            for name in ("rows.bin", "ids.bin", "skipped.jsonl"):
                (folder / name).touch()
            _atomic_write_text(head_path, json.dumps(header))
            self._write_progress()
        self._rows_f = open(folder / "rows.bin", "ab")
        self._ids_f = open(folder / "ids.bin", "ab")
        self._skip_f = open(folder / "skipped.jsonl", "a")
        self._new = [0, 0, 0]  # batches, rows, skipped appended since the last commit
        self._last_commit = time.monotonic()

    def _truncate(self) -> None:
        row_bytes = self.dim * self.dtype.itemsize
        os.truncate(self.folder / "rows.bin", self.rows * row_bytes)
        os.truncate(self.folder / "ids.bin", self.rows * 8)
        lines = (self.folder / "skipped.jsonl").read_text().splitlines(keepends=True)[: self.n_skipped]
        (self.folder / "skipped.jsonl").write_text("".join(lines))

    def _write_progress(self) -> None:
        _atomic_write_text(
            self.folder / "progress.json",
            json.dumps({"batches": self.batches, "rows": self.rows, "skipped": self.n_skipped}),
        )

    def append(self, rows: np.ndarray | None, ids: list[int], skipped, commit_every_s: float = 1.0):
        """Append one finished batch (``rows`` None: none of its images was readable); it counts as done once
        committed (at most ``commit_every_s`` later)."""
        if rows is None:
            rows = np.zeros((0, self.dim), self.dtype)
        if rows.shape != (len(ids), self.dim):
            raise ValueError(f"rows of shape {rows.shape} for {len(ids)} units of {self.dim} features")
        self._rows_f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self._ids_f.write(np.asarray(ids, dtype=np.int64).tobytes())
        for unit, reason in skipped:
            self._skip_f.write(json.dumps([unit, reason]) + "\n")
        self._new = [self._new[0] + 1, self._new[1] + len(ids), self._new[2] + len(skipped)]
        if time.monotonic() - self._last_commit >= commit_every_s:
            self.commit()

    def commit(self) -> None:
        """fsync the appended bytes, then atomically advance progress.json past them."""
        if not self._new[0]:  # no batch appended since the last commit
            return
        for f in (self._rows_f, self._ids_f, self._skip_f):
            f.flush()
            os.fsync(f.fileno())
        self.batches += self._new[0]
        self.rows += self._new[1]
        self.n_skipped += self._new[2]
        self._new = [0, 0, 0]
        self._write_progress()
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what was appended (a failure, e.g. a full disk, is raised: those batches are not saved)."""
        try:
            self.commit()
        finally:
            for f in (self._rows_f, self._ids_f, self._skip_f):
                f.close()

    def read(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """Committed (rows memmap, unit ids, skipped) of this shard."""
        ids = np.fromfile(self.folder / "ids.bin", dtype=np.int64, count=self.rows)
        if self.rows:
            rows = np.memmap(self.folder / "rows.bin", dtype=self.dtype, mode="r", shape=(self.rows, self.dim))
        else:
            rows = np.zeros((0, self.dim), self.dtype)
        lines = (self.folder / "skipped.jsonl").read_text().splitlines()[: self.n_skipped]
        return rows, ids, [tuple(json.loads(line)) for line in lines]


# ---------------------------------------------------------------------------------------------------------
# Finished files


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary name beside ``path``; once written, it is fsynced and renamed over ``path`` in one step,
    so readers see the old file or the finished new one, never a half-written one."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # same suffix: some writers check it
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB, so a mini-batch read touches one or two chunks."""
    return max(1, min(4096, (1 << 20) // (dim * itemsize)))


def write_feature_file(path: Path, meta: dict, n_rows: int, blocks, columns: dict, skipped: list[tuple[str, str]]):
    """Write a finished file atomically: ``blocks`` yields (start, rows) feature blocks in order.

    ``columns`` holds the per-row datasets (labels, paths, views, file_sizes, file_mtimes_ns).
    """
    import h5py

    dim, dtype = int(meta["feature_dim"]), np.dtype(meta["dtype"])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        compression = meta.get("compression", "none")
        feats = f.create_dataset(
            "features",
            shape=(n_rows, dim),
            dtype=dtype,
            chunks=(min(max(n_rows, 1), chunk_rows(dim, dtype.itemsize)), dim) if n_rows else None,
            compression=None if compression == "none" or not n_rows else compression,
        )
        written = 0
        for start, rows in blocks:
            feats[start : start + len(rows)] = rows
            written += len(rows)
        if written != n_rows:
            raise ValueError(f"{path}: {written} rows written, {n_rows} expected")
        f.create_dataset("labels", data=np.asarray(columns["labels"], dtype=np.int64))
        f.create_dataset("paths", data=list(columns["paths"]), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("views", data=np.asarray(columns["views"], dtype=np.int8))
        f.create_dataset("file_sizes", data=np.asarray(columns["file_sizes"], dtype=np.int64))
        f.create_dataset("file_mtimes_ns", data=np.asarray(columns["file_mtimes_ns"], dtype=np.int64))
        f.create_dataset(
            "skipped",
            shape=(len(skipped), 2),
            dtype=h5py.string_dtype("utf-8"),
            data=np.array(skipped, dtype=object).reshape(len(skipped), 2) if skipped else None,
        )
        unknown = sorted(set(meta) - set(ATTRS))
        if unknown:  # every attribute has its row in SCHEMA, so the key lists derived from it stay complete
            raise ValueError(f"{path}: attributes {', '.join(unknown)} are not in store.SCHEMA")
        for k, v in meta.items():
            f.attrs[k] = json.dumps(v) if ATTRS[k].json else v
        f.attrs["complete"] = True  # set last: a file without it was never finished


def _decode_attr(key: str, value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if key in ATTRS and ATTRS[key].json and isinstance(value, str):
        return json.loads(value)
    return value


def read_meta(path: Path) -> dict:
    """Attributes of a finished feature file, decoded; one-line errors for missing, corrupt or foreign files."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise FlowerfeatError(f"{path}: is a directory; pass one feature file, e.g. --features {path / 'train.h5'}")
    if not path.is_file():
        raise FlowerfeatError(f"{path}: feature file not found; run `flowerfeat features` first (or pass --features)")
    try:
        with h5py.File(path, "r") as f:
            meta = {k: _decode_attr(k, v) for k, v in f.attrs.items()}
            missing = [d for d in DATASETS if d not in f]
    except OSError:
        raise FlowerfeatError(
            f"{path}: not a readable HDF5 feature file (truncated or corrupt); delete it and rerun `flowerfeat features`"
        ) from None
    version = meta.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION and meta.get("complete"):
        raise FlowerfeatError(
            f"{path}: made by an earlier flowerfeat (feature format {version}, this one reads {FORMAT_VERSION}); "
            "extract again with `flowerfeat features` (the new cache goes to its own folder)"
        )
    if version != FORMAT_VERSION or missing or not meta.get("complete"):
        raise FlowerfeatError(
            f"{path}: not a finished flowerfeat feature file of format {FORMAT_VERSION}; "
            "delete it and rerun `flowerfeat features`"
        )
    return meta


@dataclass
class Features:
    """A feature file in memory, ready for scikit-learn.

    Example::

        tr = flowerfeat.load_features(files["train"])
        LogisticRegression(C=0.1, max_iter=1000).fit(tr.X, tr.y)
    """

    X: np.ndarray  # (N, D) float32 (float16 files are widened)
    y: np.ndarray  # (N,) int64, indices into ``classes``
    classes: list[str]
    paths: list[str]  # each row's image, relative to meta["data_root"]
    views: np.ndarray  # (N,) int8: 0 = centre crop, k = k-th augmented view
    skipped: list[tuple[str, str]]  # (path, reason) of each unreadable image
    meta: dict  # the file's attributes: layer, weights, preprocessing, fingerprint, ...
    path: Path | None = None  # the file it came from

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return (
            f"Features({len(self.y)} rows x {self.X.shape[1]} ({self.meta.get('layer', '?')}), "
            f"classes {self.classes}{where})"
        )


def load_features(path: str | Path) -> Features:
    """Load a finished feature file (``flowerfeat features`` / ``flowerfeat.extract``) into memory.

    Example::

        tr = flowerfeat.load_features("data/features/vgg16-fc7-imagenet/train.h5")
        LogisticRegression(C=0.1, max_iter=1000).fit(tr.X, tr.y)

    Raises ``FlowerfeatError`` (one line naming the path and the fix) for a missing, unfinished or foreign file.
    """
    import h5py

    path = Path(path)
    meta = read_meta(path)
    with h5py.File(path, "r") as f:
        return Features(
            X=f["features"][...].astype(np.float32, copy=False),
            y=f["labels"][...].astype(np.int64, copy=False),
            classes=list(meta["classes"]),
            paths=[p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][...]],
            views=f["views"][...],
            skipped=_skipped_rows(f),
            meta=meta,
            path=path,
        )


def _skipped_rows(f) -> list[tuple[str, str]]:
    return [tuple(x.decode() if isinstance(x, bytes) else x for x in row) for row in f["skipped"][...]]


def count_rows(path: Path) -> int:
    """Rows of a finished feature file (the length of its datasets: not stored beside them)."""
    import h5py

    with h5py.File(path, "r") as f:
        return len(f["labels"])


def read_skipped(path: Path) -> list[tuple[str, str]]:
    import h5py

    with h5py.File(path, "r") as f:
        return _skipped_rows(f)
