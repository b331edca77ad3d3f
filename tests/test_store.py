"""The append log, atomic finished files, readers' errors, and extraction that survives kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from flowerfeat import store
from flowerfeat.errors import FlowerfeatError
from conftest import cached, extract, make_folder, write_features

HEADER = {"fingerprint": "abc", "feature_dim": 3, "dtype": "float32", "batch_size": 2}


def test_shard_log_keeps_only_committed_batches(tmp_path):
    log = store.ShardLog(tmp_path / "p", HEADER)
    log.append(np.ones((2, 3), np.float32), [0, 1], [], commit_every_s=0)
    log.append(np.full((1, 3), 2, np.float32), [3], [(2, "empty file")], commit_every_s=0)
    log.append(np.full((2, 3), 9, np.float32), [4, 5], [], commit_every_s=3600)  # written, never committed
    log._rows_f.flush()
    del log  # as if killed: no close(), so the last batch is not committed
    again = store.ShardLog(tmp_path / "p", HEADER)
    assert (again.batches, again.rows, again.n_skipped) == (2, 3, 1)
    rows, ids, skipped = again.read()
    assert ids.tolist() == [0, 1, 3] and rows[:, 0].tolist() == [1, 1, 2] and skipped == [(2, "empty file")]
    assert os.path.getsize(tmp_path / "p" / "rows.bin") == 3 * 3 * 4  # the torn tail was truncated


def test_shard_log_from_another_configuration_is_discarded(tmp_path):
    log = store.ShardLog(tmp_path / "p", HEADER)
    log.append(np.ones((2, 3), np.float32), [0, 1], [], commit_every_s=0)
    log.close()
    other = store.ShardLog(tmp_path / "p", {**HEADER, "fingerprint": "def"})
    assert other.rows == 0 and "another configuration" in other.discarded


def test_read_meta_refuses_missing_corrupt_truncated_and_unfinished(tmp_path):
    with pytest.raises(FlowerfeatError, match="feature file not found; run `flowerfeat features`"):
        store.read_meta(tmp_path / "nope.h5")
    with pytest.raises(
        FlowerfeatError, match=f"is a directory; pass one feature file, e.g. --features {tmp_path}/train.h5"
    ):
        store.read_meta(tmp_path)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FlowerfeatError, match="not a readable HDF5 feature file"):
        store.read_meta(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(FlowerfeatError, match="not a finished flowerfeat feature file"):
        store.read_meta(tmp_path / "other.h5")


def test_truncated_feature_file_is_refused(folder, tmp_path):
    extract(folder, tmp_path / "f")
    path = cached(tmp_path / "f", folder) / "train.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlowerfeatError, match="truncated or corrupt"):
        store.load_features(path)


def _run(data, out):
    return subprocess.run(
        [sys.executable, str(Path(__file__).parent / "slow_extract.py"), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path):
    data = make_folder(tmp_path / "flowers", {"train": 12, "test": 4})  # 36 + 12 images, batch 2
    _run(data, tmp_path / "clean")
    out = tmp_path / "killed"
    script = str(Path(__file__).parent / "slow_extract.py")
    kills = 0
    for delay in (0.6, 1.3, 2.1, 0.9, 1.7):
        proc = subprocess.Popen([sys.executable, script, str(data), str(out)], stdout=subprocess.PIPE)
        start = time.monotonic()
        while time.monotonic() - start < delay and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert (
            not (cached(out, data) / "test.h5").exists() or (cached(out, data) / "train.h5").exists()
        )  # finished files appear in order
    assert kills >= 3
    final = _run(data, out)
    assert "resumed" in final.stdout or "extracted" in final.stdout or "up to date" in final.stdout
    for split in ("train", "test"):
        with (
            h5py.File(cached(tmp_path / "clean", data) / f"{split}.h5", "r") as a,
            h5py.File(cached(out, data) / f"{split}.h5", "r") as b,
        ):
            for name in store.DATASETS:
                np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=f"{split}/{name}")
            assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
    assert not any(p.name.endswith(".partial") for p in cached(out, data).iterdir())


def test_two_concurrent_extractions_one_refuses_neither_corrupts(tmp_path):
    data = make_folder(tmp_path / "flowers", {"train": 8, "test": 2})
    script = str(Path(__file__).parent / "slow_extract.py")
    first = subprocess.Popen(
        [sys.executable, script, str(data), str(tmp_path / "f")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLOW_TRUNK_S": "0.6"},
    )
    deadline = time.monotonic() + 60
    while not (cached(tmp_path / "f", data) / "train.h5.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, script, str(data), str(tmp_path / "f")], capture_output=True, text=True)
    assert second.returncode != 0 and "another flowerfeat run is writing here" in second.stderr
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    _run(data, tmp_path / "clean")
    with (
        h5py.File(cached(tmp_path / "clean", data) / "train.h5", "r") as a,
        h5py.File(cached(tmp_path / "f", data) / "train.h5", "r") as b,
    ):
        np.testing.assert_array_equal(a["features"][...], b["features"][...])


def test_every_written_attribute_is_in_the_schema(folder, tmp_path):
    import h5py

    res = extract(folder, tmp_path / "f")
    with h5py.File(res["train"].path, "r") as f:
        written = set(f.attrs)
    assert written == set(store.ATTRS), written ^ set(store.ATTRS)
    meta = store.read_meta(res["train"].path)
    assert meta["model_key"] == store.model_key(meta) and set(store.MODEL_KEY_FIELDS) < written
    with pytest.raises(ValueError, match="attributes colour are not in store.SCHEMA"):
        write_features(tmp_path / "x.h5", np.zeros((3, 2), np.float32), np.arange(3), colour="blue")
