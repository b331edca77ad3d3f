"""The layouts people have, end to end without flags: features -> fit-head -> report on tiny synthetic folders."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

from flowerfeat import store
from flowerfeat.cli import app
from flowerfeat.errors import FlowerfeatError
from flowerfeat.layouts import scan_data
from conftest import make_folder

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


def journey(data, out):
    """features, fit-head, report, with no flags but the tiny model: what each printed."""
    steps = [run("features", "--data", data, "--out", out, "--model", "tiny", "--weights", "none", "--workers", "0")]
    steps.append(run("fit-head", "--features", out))
    steps.append(run("report", "--head", out))
    for r in steps:
        assert r.exit_code == 0, r.output
    return [r.output for r in steps]


def test_hymenoptera_train_and_val(tmp_path):
    """torchvision's tutorial data: train/ and val/, no test/: val.h5 chooses the epoch and is what the report uses."""
    data = make_folder(tmp_path / "hymenoptera_data", {"train": 4, "val": 2}, classes=("ants", "bees"))
    features, fit, report = journey(data, tmp_path / "f")
    assert re.search(r"train: 8 extracted .*\nval: 4 extracted -> \S+/val\.h5", features), features
    assert "Validation: " in fit and "val.h5 (4 images)" in fit and "Kept epoch" in fit
    assert "Validation Accuracy (Overall)" in report and "Test Accuracy" not in report


def test_kaggle_train_valid_test(tmp_path):
    data = make_folder(tmp_path / "kaggle", {"train": 4, "valid": 2, "test": 2})
    features, fit, report = journey(data, tmp_path / "f")
    assert {p.name for p in store.split_files(store.cache_folders(tmp_path / "f")[0])} == {"train.h5", "val.h5",
                                                                                            "test.h5"}  # fmt: skip
    assert "val.h5 (6 images)" in fit
    assert "Test Accuracy (Overall)" in report and re.search(r"\( ?\d/ 6\)", report)  # the test split: 6 images


def test_a_test_split_missing_a_class(tmp_path):
    data = make_folder(tmp_path / "d", {"train": 4, "test": 2})
    shutil.rmtree(data / "test" / "tulips")
    features, _fit, report = journey(data, tmp_path / "f")
    assert "no tulips images in test" in features
    assert "Test Accuracy of tulips: N/A (no test examples)" in report and "(Overall)" in report


def test_a_class_only_in_validation_is_refused_in_one_line(tmp_path):
    data = make_folder(tmp_path / "d", {"train": 2, "val": 1})
    (data / "val" / "roses").rename(data / "val" / "orchids")
    r = run("features", "--data", data, "--model", "tiny", "--out", tmp_path / "f")
    assert r.exit_code == 2 and r.output.strip().endswith(
        "val: class folder(s) orchids are not in the training split (nothing to learn them from); add them to the "
        "training images or remove them from val/"
    ), r.output


def test_errors_name_the_folders_there_and_the_names_understood(tmp_path):
    data = make_folder(tmp_path / "d", {"valid": 1, "test": 1})
    with pytest.raises(FlowerfeatError, match=r"no train/ folder \(found: valid/, test/\); .*understood: train/, "
                       r"val/ \(or valid/, validation/\) and test/"):  # fmt: skip
        scan_data(data)
    make_folder(data, {"train": 1, "val": 1})
    with pytest.raises(FlowerfeatError, match="both val/ and valid/ hold the val split; keep one of them"):
        scan_data(data)


def test_csv_split_columns_and_fastais_is_valid(tmp_path):
    root = make_folder(tmp_path / "imgs", {"all": 3})
    files = sorted(p.relative_to(tmp_path).as_posix() for p in root.rglob("*.*"))
    rows = [f"{f},{f.split('/')[2]},{'True' if k % 2 else 'False'}" for k, f in enumerate(files)]
    (tmp_path / "labels.csv").write_text("name,label,is_valid\n" + "\n".join(rows) + "\n")  # fastai's columns
    splits = scan_data(tmp_path / "labels.csv")
    assert list(splits) == ["train", "val"] and [len(s.items) for s in splits.values()] == [5, 4]
    rows = [f"{f},{f.split('/')[2]},{('train', 'valid', 'test')[k % 3]}" for k, f in enumerate(files)]
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")  # no header: path, label, split
    splits = scan_data(tmp_path / "split.csv")
    assert list(splits) == ["train", "val", "test"] and splits["val"].name == "val"
    (tmp_path / "bad.csv").write_text("\n".join(r.replace(",test", ",holdout") for r in rows) + "\n")
    with pytest.raises(FlowerfeatError, match="row 3: split 'holdout' is not train, val"):
        scan_data(tmp_path / "bad.csv")
