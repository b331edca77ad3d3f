"""torchrun with 2 gloo processes on CPU: sharded extraction equals a single-process run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from flowerfeat import store
from conftest import cached, make_folder

SCRIPT = str(Path(__file__).parent / "slow_extract.py")


def torchrun(data, out, slow="0", **popen):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        SCRIPT,
        str(data),
        str(out),
    ]
    env = {**os.environ, "SLOW_TRUNK_S": slow, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def _kill_all(marker: str):
    """SIGKILL every process whose command line mentions ``marker`` (torchrun's workers leave its group)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def assert_same(a_path: Path, b_path: Path):
    with h5py.File(a_path, "r") as a, h5py.File(b_path, "r") as b:
        for name in store.DATASETS:
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]


def test_two_rank_extraction_equals_one_process(tmp_path):
    data = make_folder(tmp_path / "flowers", {"train": 7, "test": 3})  # 21 train images: shards of unequal size
    (data / "train" / "roses" / "broken.jpg").write_bytes(b"not an image")
    single = subprocess.run([sys.executable, SCRIPT, str(data), str(tmp_path / "one")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    r = torchrun(data, tmp_path / "two")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 1:" in r.stdout and "rank 0:" in r.stdout
    for split in ("train", "test"):
        assert_same(cached(tmp_path / "one", data) / f"{split}.h5", cached(tmp_path / "two", data) / f"{split}.h5")
    assert store.read_skipped(cached(tmp_path / "two", data) / "train.h5") == [
        ("train/roses/broken.jpg", "not an image Pillow can read")
    ]
    assert not list(cached(tmp_path / "two", data).glob("*.partial"))


def test_killed_torchrun_job_resumes_to_the_same_file(tmp_path):
    data = make_folder(tmp_path / "flowers", {"train": 10, "test": 2})
    subprocess.run([sys.executable, SCRIPT, str(data), str(tmp_path / "one")], check=True, capture_output=True)
    job = torchrun(data, tmp_path / "two", slow="0.3", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    progress = list(cached(tmp_path / "two", data).glob("train.h5.partial/rank*/progress.json"))
    while time.monotonic() < deadline and not any('"batches": 0' not in p.read_text() for p in progress):
        time.sleep(0.1)
        progress = list(cached(tmp_path / "two", data).glob("train.h5.partial/rank*/progress.json"))
    _kill_all(str(tmp_path / "two"))  # torchrun and every rank die at once
    job.wait()
    assert not (cached(tmp_path / "two", data) / "train.h5").exists()
    r = torchrun(data, tmp_path / "two")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stdout
    assert_same(cached(tmp_path / "one", data) / "train.h5", cached(tmp_path / "two", data) / "train.h5")
