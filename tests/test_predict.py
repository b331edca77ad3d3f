"""predict: the trained head used on new images, with the trunk that made its features."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from flowerfeat import train
from flowerfeat.cli import app
from flowerfeat.config import FitConfig
from conftest import blobs, make_folder, vgg_preprocessing, write_features

runner = CliRunner()


@pytest.fixture(scope="module")
def head_fc7(tmp_path_factory):
    """A head for random-init VGG16 fc7 features (classes daisy/roses/tulips), trained on hand-made rows."""
    tmp = tmp_path_factory.mktemp("head")
    x, y = blobs(10, dim=4096)
    path = write_features(
        tmp / "train.h5", x, y, classes=("daisy", "roses", "tulips"), preprocessing=vgg_preprocessing()
    )
    cfg = FitConfig(features=path, out=tmp / "head.pt")
    res, meta = train.fit(cfg)
    train.Head.from_fit(res, meta, cfg).save(cfg.out)
    return cfg.out


def test_predict_lines_and_files(head_fc7, tmp_path):
    root = make_folder(tmp_path / "imgs", {"new": 1})
    (root / "new" / "daisy" / "broken.jpg").write_bytes(b"nope")
    r = runner.invoke(
        app, ["predict", str(root), "--head", str(head_fc7), "--top-k", "2", "--output", str(tmp_path / "p.csv")]
    )
    assert r.exit_code == 0, r.output
    lines = [s for s in r.output.splitlines() if s.endswith(tuple("0123456789"))]
    assert len(lines) == 3 and all(s.count(", ") == 1 for s in lines)
    assert "warning: skipped" in r.output and "broken.jpg" in r.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 3 * 2 + 1
    first = [row for row in rows if row["rank"] == "1"]
    assert all(row["class"] in ("daisy", "roses", "tulips") and 0 < float(row["probability"]) <= 1 for row in first)
    out = tmp_path / "new_folder" / "p.json"  # its folder is made
    r = runner.invoke(app, ["predict", str(root / "new" / "roses"), "--head", str(head_fc7), "--output", str(out)])
    data = json.loads(out.read_text())
    assert r.exit_code == 0 and len(data) == 1 and data[0]["top"][0]["class"] in ("daisy", "roses", "tulips")


def test_predict_refuses_an_unknown_output_format_before_classifying(head_fc7, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"new": 1})
    monkeypatch.setattr(
        "flowerfeat.predict.TrunkSpec.build", lambda self: pytest.fail("the trunk was built before --output was checked")
    )
    r = runner.invoke(app, ["predict", str(root), "--head", str(head_fc7), "--output", str(tmp_path / "p.txt")])
    assert r.exit_code == 2 and "p.txt: --output must end in .csv or .json" in r.output
    assert not (tmp_path / "p.txt").exists()


def test_predict_refuses_other_weights(head_fc7, tmp_path):
    other = tmp_path / "w.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    r = runner.invoke(app, ["predict", str(tmp_path), "--head", str(head_fc7), "--weights", str(other)])
    assert r.exit_code == 2 and "the head was trained on features from none:random-init-seed-0" in r.output
