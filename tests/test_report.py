"""Report lines, metrics JSON and figures against a hand-built case whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowerfeat import report, store, train
from flowerfeat.config import FitConfig
from flowerfeat.errors import FlowerfeatError
from conftest import write_features

# 9 test rows, 3 classes; the head is the identity, so the prediction is the argmax of each row.
X = np.array(
    [
        [5, 0, 0],
        [5, 0, 0],
        [5, 0, 0],
        [0, 5, 0],  # a: 3 of 4 right
        [0, 5, 0],
        [0, 5, 0],
        [0, 5, 0],  # b: 3 of 3 right
        [0, 0, 5],
        [5, 0, 0],
    ],
    np.float32,
)  # c: 1 of 2 right
Y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])


@pytest.fixture
def case(tmp_path):
    test_file = write_features(tmp_path / "test.h5", X, Y)
    meta = store.read_meta(test_file)
    head = train.FitResult(torch.eye(3), torch.zeros(3), {"train_acc": 1.0})
    train.Head.from_fit(head, meta, FitConfig()).save(tmp_path / "head.pt")
    return test_file, tmp_path / "head.pt"


def test_textbook_lines_for_a_known_case(case):
    test_file, head = case
    ev = report.evaluate(head, test_file)
    logits = torch.from_numpy(X)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(Y)).item()
    assert report.textbook_lines(ev) == [
        f"Test Loss: {loss:.6f}",
        "",
        "Test Accuracy of     a: 75% ( 3/ 4)",
        "Test Accuracy of     b: 100% ( 3/ 3)",
        "Test Accuracy of     c: 50% ( 1/ 2)",
        "",
        "Test Accuracy (Overall): 77% ( 7/ 9)",
    ]
    assert report.confusion(ev).tolist() == [[3, 1, 0], [0, 3, 0], [1, 0, 1]]


def test_metrics_json_values(case):
    test_file, head = case
    m = report.metrics(report.evaluate(head, test_file))
    assert m["overall"] == {"accuracy": 7 / 9, "correct": 7, "total": 9}
    a = m["per_class"]["a"]
    assert a["accuracy"] == 0.75 and a["precision"] == 0.75 and a["recall"] == 0.75
    assert m["per_class"]["b"]["precision"] == 0.75 and m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"][2] == [1, 0, 1]


def test_figures_are_written_and_not_empty(case, tmp_path):
    test_file, head = case
    from PIL import Image

    ev = report.evaluate(head, test_file)
    for i, p in enumerate(ev.paths):  # give the grid real images to show
        f = tmp_path / p
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i % 255, 90, 160)).save(f)
    written = report.write_figures(ev, tmp_path / "fig")
    assert [p.name for p in written] == ["confusion_matrix.png", "samples.png"]
    for p in written:
        assert Image.open(p).size[0] > 100


def test_head_and_features_from_different_classes_are_refused(case, tmp_path):
    _, head = case
    other = write_features(tmp_path / "other.h5", X, Y, classes=("x", "y", "z"))
    with pytest.raises(FlowerfeatError, match="features do not match head"):
        report.evaluate(head, other)
