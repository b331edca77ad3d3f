"""The scripts keep working on the package as it is: scripts/gpu_check.py's CPU smoke path, with the tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_runs_its_cpu_smoke_path(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    r = gpu_check.main(["--smoke", "--model", "tiny", "--n", "40", "--copies", "1", "--batch", "8",
                        "--steps", "warm,parts,agreement", "--out", str(tmp_path)])  # fmt: skip
    assert "errors" not in r, r["errors"]
    assert r["warm"]["hybrid"]["rows"] == r["warm"]["gpu"]["rows"] == r["synth"]["train_files"] == 38
    assert r["repeat_max_abs_diff"] == 0 and r["agreement_synthetic_hybrid"]["min"] > 0.999
    assert (tmp_path / "gpu_check.json").is_file()
