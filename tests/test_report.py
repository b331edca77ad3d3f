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
    assert ev.confusion_matrix.tolist() == [[3, 1, 0], [0, 3, 0], [1, 0, 1]]


def test_metrics_json_values(case):
    test_file, head = case
    m = report.metrics(report.evaluate(head, test_file))
    assert m["overall"] == {"accuracy": 7 / 9, "correct": 7, "total": 9, "split": "test"}
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


def test_error_analysis_names_the_misclassified_images(case, tmp_path):
    test_file, head = case
    ev = report.evaluate(head, test_file)
    m = ev.to_dict()
    assert m["macro avg"] == pytest.approx({"precision": (0.75 + 0.75 + 1) / 3, "recall": (0.75 + 1 + 0.5) / 3,
                                            "f1": (0.75 + 6 / 7 + 2 / 3) / 3, "support": 9})  # fmt: skip
    assert m["weighted avg"]["recall"] == pytest.approx(7 / 9)
    wrong = m["misclassified"]
    assert [(w["true"], w["predicted"]) for w in wrong] == [("a", "b"), ("c", "a")]
    assert wrong[0]["path"] == ev.paths[3] and 0.98 < wrong[0]["probability"] < 1 and wrong[0]["p_true"] < 0.01
    assert m["most_confused"] == [
        {"true": "a", "predicted": "b", "count": 1},
        {"true": "c", "predicted": "a", "count": 1},
    ]
    assert m["provenance"]["layer"] == "fc7" and m["provenance"]["test_features"] == str(test_file)
    rows = (tmp_path / "e.csv").read_text().splitlines() if report.write_errors(ev, tmp_path / "e.csv") else []
    assert rows[0] == "path,true,predicted,probability,p_true" and len(rows) == 3


def test_report_text_keeps_the_textbook_lines_first_then_the_confusions(case):
    from typer.testing import CliRunner

    from flowerfeat.cli import app

    test_file, head = case
    r = CliRunner().invoke(app, ["report", "--features", str(test_file), "--head", str(head)])
    ev = report.evaluate(head, test_file)
    assert r.exit_code == 0 and r.output.split("\n", 1)[1].startswith("\n".join(report.textbook_lines(ev)) + "\n")
    assert "Most confused (true -> predicted):\n  a -> b  1\n  c -> a  1" in r.output


def test_figures_show_errors_first_and_names_in_any_script_quietly(tmp_path, recwarn):
    from PIL import Image

    classes = ("雏菊", "玫瑰", "郁金香")  # glyphs DejaVu Sans lacks
    test_file = write_features(tmp_path / "test.h5", X, Y, classes=classes)
    head = train.Head.from_fit(
        train.FitResult(torch.eye(3), torch.zeros(3), {}), store.read_meta(test_file), FitConfig()
    )
    ev = report.evaluate(head, test_file)
    for i, p in enumerate(ev.paths):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i % 255, 90, 160)).save(tmp_path / p)
    ev.data_root = str(tmp_path)
    fig = report.samples_figure(ev, n_samples=4)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("玫瑰 ") and "wrong: is 雏菊" in titles[0] and "wrong: is 郁金香" in titles[1]
    assert "(right)" in titles[2] and "%" in titles[0]
    report.write_figures(ev, tmp_path / "fig")
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    assert len(report.confusion_figure(ev).axes) == 3  # counts, shares, and the shares' colour bar
