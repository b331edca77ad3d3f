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
    lines = [s for s in r.stdout.splitlines() if s.endswith(tuple("0123456789"))]
    assert len(lines) == 3 and all(s.count(", ") == 1 for s in lines)
    assert r.stderr.startswith(f"head {head_fc7}: vgg16 fc7, 3 classes")  # with --output, which head on stderr
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
        "flowerfeat.predict.build", lambda *a, **k: pytest.fail("the trunk was built before --output was checked")
    )
    r = runner.invoke(app, ["predict", str(root), "--head", str(head_fc7), "--output", str(tmp_path / "p.txt")])
    assert r.exit_code == 2 and "p.txt: --output must end in .csv or .json" in r.output
    assert not (tmp_path / "p.txt").exists()


def test_predict_refuses_other_weights(head_fc7, tmp_path):
    other = tmp_path / "w.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    r = runner.invoke(app, ["predict", str(tmp_path), "--head", str(head_fc7), "--weights", str(other)])
    assert r.exit_code == 2 and "the head was trained on features from none:random-init-seed-0" in r.output


def _head_and_test(folder, tmp_path, **kw):
    import flowerfeat

    files = flowerfeat.extract(folder, tmp_path / "f", model="tiny", weights="none", workers=0, **kw)
    head = flowerfeat.fit_head(files["train"], epochs=2)
    head.save(tmp_path / "head.pt")
    test = flowerfeat.load_features(files["test"])
    return tmp_path / "head.pt", test, [f"{test.meta['data_root']}/{p}" for p in test.paths]


def test_predict_decodes_as_the_features_were_decoded(folder, tmp_path):
    import numpy as np

    import flowerfeat

    path, test, images = _head_and_test(folder, tmp_path, decode="hybrid")  # libjpeg in the readers
    clf = flowerfeat.Classifier.load(path)
    assert clf.recipe.decoder == "libjpeg" and clf.mode == "hybrid" and clf.notes == []
    want = np.log(flowerfeat.Head.load(path).predict_proba(test.X))  # log: the small probabilities tell too
    got = np.log([[dict(p.top)[c] for c in clf.classes] for p in clf.predict(images, top_k=3)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # PIL's decode and resize of the same files give other pixels: the decoder is what makes the match
    pil = flowerfeat.Classifier(clf.head, clf.recipe, clf.device, mode="cpu").predict(images, top_k=3)
    assert np.abs(np.log([[dict(p.top)[c] for c in clf.classes] for p in pil]) - want).max() > 1e-3


def test_features_decoded_on_a_gpu_are_predicted_here_with_a_note(folder, tmp_path):
    import flowerfeat

    path, _test, images = _head_and_test(folder, tmp_path)
    head = flowerfeat.Head.load(path)
    head.meta["features"]["decoder"] = "nvjpeg"  # as if extracted on a GPU
    clf = flowerfeat.Classifier.load(head)
    assert clf.mode == "hybrid" and len(clf.notes) == 1 and "decoded by nvjpeg on a GPU" in clf.notes[0]
    assert all(p.label in head.classes for p in clf.predict(images))
