"""The store: the one owner of flowerfeat's files on disk. ``layout`` knows where everything lives (cache folders,
split files, work in progress, engine files, LATEST, heads), ``features`` the HDF5 feature file (its schema, the
writer, the readers), ``shards`` the crash-safe log of work in progress, ``checkpoints`` the head files. No other
module spells a path or opens h5py.

A split is extracted into ``<split>.h5.partial/`` (append-only binary rows + a progress file that is replaced
atomically after the rows it counts are fsynced), and only when every row is there is ``<split>.h5`` written under a
temporary name and renamed into place. So a ``<split>.h5`` always is a finished file, and a killed run resumes from
its last committed batch.
"""

from flowerfeat.store.checkpoints import load_checkpoint, read_checkpoint_meta, save_checkpoint
from flowerfeat.store.features import (
    ATTRS, CHECKED_FIELDS, DATASETS, HEAD_FIELDS, MODEL_KEY_FIELDS, SCHEMA, SETTINGS_FIELDS, Attr, FeatureReader,
    Features, chunk_rows, count_rows, describe_difference, engine_of, fingerprint, load_features, model_key,
    read_meta, read_skipped, row_keys, write_feature_file,
)  # fmt: skip
from flowerfeat.store.layout import (
    HEADS, LATEST, LEGACY_RUNS, EngineFiles, atomic_path, cache_dir, cache_folders, check_writable, dataset_of,
    discard_unused, dataset_tag, engine_files, exclusive_lock, find_features, find_head, head_path, heads_under,
    mark_dataset, mark_latest, other_copies, partial_dir, shard_dir, sibling_split, speed_file, split_file, split_files,
    user_cache, write_text,
)  # fmt: skip
from flowerfeat.store.shards import ShardLog

__all__ = [
    "ATTRS", "CHECKED_FIELDS", "DATASETS", "HEADS", "HEAD_FIELDS", "LATEST", "LEGACY_RUNS", "MODEL_KEY_FIELDS",
    "SCHEMA", "SETTINGS_FIELDS", "Attr", "EngineFiles", "FeatureReader", "Features", "ShardLog", "atomic_path",
    "cache_dir", "cache_folders", "check_writable", "chunk_rows", "count_rows", "dataset_of", "dataset_tag",
    "describe_difference", "discard_unused", "engine_files", "engine_of", "exclusive_lock", "find_features",
    "find_head", "fingerprint",
    "head_path", "heads_under", "load_checkpoint", "load_features", "mark_dataset", "mark_latest", "model_key",
    "other_copies", "partial_dir", "read_checkpoint_meta", "read_meta", "read_skipped", "row_keys", "save_checkpoint",
    "shard_dir", "sibling_split", "speed_file", "split_file", "split_files", "user_cache", "write_feature_file",
    "write_text",
]  # fmt: skip
