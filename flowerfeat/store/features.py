"""The feature file: its HDF5 schema in one place, the atomic writer, and the readers (whole, by rows, streamed).

Every HDF5 dataset and attribute name is spelled here; no other module opens h5py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerfeat import FORMAT_VERSION
from flowerfeat.errors import FlowerfeatError
from flowerfeat.store.layout import atomic_path


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
    Attr("view_scale", settings=True, json=True),  # None without views
    Attr("layout", settings=True),  # folders, flat or csv
    Attr("test_fraction", settings=True),
    Attr("data_root", head=True),  # where the images were: the head's data set
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
# settings added after format 2 enter the fingerprint only when set, so the caches made before keep theirs
LATER = ("view_scale",)
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
    settings = [meta.get(k) for k in SETTINGS_FIELDS if k not in LATER or meta.get(k) is not None]
    h.update(json.dumps(settings).encode())
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
# Finished files


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
            f"{path}: not a readable HDF5 feature file (truncated or corrupt); delete it and rerun "
            "`flowerfeat features`"
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


def row_keys(path: Path) -> dict[tuple, int]:
    """Each row of a finished file by what identified its unit: (path, view, size, mtime_ns) -> row."""
    import h5py

    with h5py.File(path, "r") as f:
        paths = [p.decode() for p in f["paths"][...]]
        keys = zip(paths, f["views"][...].tolist(), f["file_sizes"][...].tolist(), f["file_mtimes_ns"][...].tolist())
        return {k: r for r, k in enumerate(keys)}


class FeatureReader:
    """Rows of a finished file read from disk as asked: by block (the file's HDF5 chunks), by any rows, or whole;
    for training streamed from disk and for merging reused rows. Use as a context manager (or ``close``)."""

    def __init__(self, path: Path):
        import h5py

        self.meta = read_meta(path)
        self.path = Path(path)
        self._file = h5py.File(path, "r")
        self._ds = self._file["features"]
        self.n, self.dim = self._ds.shape
        self.block = self._ds.chunks[0] if self._ds.chunks else max(1, self.n)  # rows per HDF5 chunk
        self.labels = self._file["labels"][...]  # (N,) int64: 8 bytes a row beside 4*D of features

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def all(self) -> np.ndarray:
        """Every row, as float32."""
        return self._ds[...].astype(np.float32, copy=False)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` in the stored dtype."""
        return self._ds[start:stop]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at any (distinct) indices, in the stored dtype, in the order given (h5py reads increasing ones)."""
        order = np.argsort(rows)
        out = np.empty((len(rows), self.dim), self._ds.dtype)
        out[order] = self._ds[np.asarray(rows)[order]]
        return out

    def paths(self) -> np.ndarray:
        """Each row's image path (views of one image share it)."""
        return self._file["paths"][...]
