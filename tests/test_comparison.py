"""compare: candidates measured on a sample of the user's own images, the same folds for all, cached and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import flowerfeat
from flowerfeat import comparison, store
from flowerfeat.cli import app
from conftest import make_folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("cmp") / "flowers", {"train": 8, "test": 1})


def test_a_larger_sample_starts_with_the_smaller_one_and_stays_stratified(photos):
    small, n = comparison.sample_split(photos, 9, seed=0)
    large, _ = comparison.sample_split(photos, 15, seed=0)
    assert n == 24 and large.items[:9] == small.items
    assert sorted(np.bincount([it.label for it in small.items])) == [3, 3, 3]  # stratified
    other, _ = comparison.sample_split(photos, 9, seed=1)
    assert other.items != small.items  # seeded
    everything, _ = comparison.sample_split(photos, 500, seed=0)
    assert len(everything.items) == 24  # every image when fewer


def test_compare_scores_each_candidate_on_the_same_folds_and_reports_the_ones_that_cannot_run(photos, tmp_path):
    result = flowerfeat.compare(photos, ["tiny@grid", "tiny@mean", "nonsense"], sample=18, folds=3, out=tmp_path, workers=0)
    grid, mean, bad = result.rows
    assert (grid.layer, grid.dim, mean.layer, mean.dim) == ("grid", 24, "mean", 6)
    for r in (grid, mean):
        assert 0 <= r.head_mean <= 1 and 0 <= r.probe_mean <= 1 and r.head_std >= 0
        assert r.images_per_s > 0 and r.speed_measured == "this run"
        assert r.full_disk_bytes == 24 * r.dim * 4 and r.full_extract_s == pytest.approx(24 / r.images_per_s)
    assert bad.error.startswith("unknown model 'nonsense'") and bad.head_mean is None
    assert any(r.on_front for r in (grid, mean)) and result.sample == 18 and result.folds == 3
    lines = comparison.table_lines(result)
    assert "nonsense" in lines[-2] and "could not run" in lines[-2] and "tiny" in lines[2]


def test_a_rerun_extracts_nothing_and_a_larger_sample_adds_only_the_new_images(photos, tmp_path, monkeypatch):
    from flowerfeat import extraction

    flowerfeat.compare(photos, ["tiny"], sample=12, folds=3, out=tmp_path, workers=0)
    computed = []
    real = extraction.extract_split
    monkeypatch.setattr(extraction, "extract_split", lambda *a, **k: computed.append(r := real(*a, **k)) or r)
    again = flowerfeat.compare(photos, ["tiny"], sample=12, folds=3, out=tmp_path, workers=0)
    assert computed[-1].computed == 0 and again.rows[0].speed_measured.startswith("earlier run")
    flowerfeat.compare(photos, ["tiny"], sample=18, folds=3, out=tmp_path, workers=0)
    assert computed[-1].computed == 6 and computed[-1].reused == 12


def test_the_same_folds_serve_every_candidate():
    labels = np.repeat([0, 1, 2], 5)
    split = type("S", (), {})()
    split.items = [type("I", (), {"label": int(y), "relpath": f"{i}.jpg"})() for i, y in enumerate(labels)]
    a = comparison.make_folds(split, 5, seed=0)
    b = comparison.make_folds(split, 5, seed=0)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert sorted(np.concatenate([v for _t, v in a]).tolist()) == list(range(15))  # each image held out once


def test_cli_prints_the_table_json_and_figure(photos, tmp_path):
    out = tmp_path / "c"
    args = ["compare", "--data", photos, "--model", "tiny", "--model", "tiny@mean", "--sample", "12", "--folds", "3",
            "--out", out, "--figure", tmp_path / "f.png"]  # fmt: skip
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert "default head" in r.output and "accuracy-versus-speed front" in r.output
    assert (tmp_path / "f.png").stat().st_size > 5000
    r = CliRunner().invoke(app, [str(a) for a in args[:-2]] + ["--json"])
    rows = json.loads(r.output[r.output.index("{"):])["rows"]
    assert [row["layer"] for row in rows] == ["grid", "mean"] and all(row["speed_measured"] for row in rows)
    r = CliRunner().invoke(app, ["compare", "--data", str(photos), "--weights", "vgg16"])
    assert r.exit_code == 2 and "--weights takes MODEL=PATH" in r.output



def test_one_candidate_takes_a_bare_weights_path(photos, tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import TinyTrunk

    torch.save(TinyTrunk().state_dict(), tmp_path / "tiny.pth")
    args = ["compare", "--data", photos, "--model", "tiny", "--weights", tmp_path / "tiny.pth", "--sample", "12",
            "--folds", "3", "--out", tmp_path / "c", "--json"]  # fmt: skip
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert not json.loads(r.stdout)["rows"][0]["error"]
    assert "tiny-grid-tiny-" in str(store.cache_folders(tmp_path / "c")[0])  # the file's weights, not random ones


def test_the_figure_keeps_its_labels_apart_and_inside(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [comparison.Row("a", "timm:tf_efficientnet_lite0", "pre-logits", 1280, 0.93, 0.01, 0.94, 0.01, 0.95),
            comparison.Row("b", "vgg16", "pool5-gap", 512, 0.88, 0.02, 0.89, 0.02, 0.52),
            comparison.Row("c", "convnext_tiny", "pool", 768, 0.80, 0.02, 0.81, 0.02, 0.7)]  # fmt: skip
    comparison.mark_front(rows)
    fig = comparison.figure(comparison.Comparison(rows, 100, 1000, 5, 1.0, tmp_path))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    assert len(ticks) >= 2 and all(not a.overlaps(b) for i, a in enumerate(ticks) for b in ticks[i + 1 :])
    frame = fig.bbox
    texts = [*ax.texts, *fig.legends[0].get_texts()]
    assert all(frame.x0 <= t.get_window_extent(renderer).x0 and t.get_window_extent(renderer).x1 <= frame.x1
               for t in texts)  # fmt: skip
    assert any("timm:tf_efficientnet_lite0 pre-logits" in t.get_text() for t in fig.legends[0].get_texts())
    front = fig.legends[0].legend_handles[-1]
    assert front.get_linestyle() == "--" and front.get_visible()


def test_a_trained_top_is_one_more_candidate(photos, tmp_path, monkeypatch):
    from flowerfeat import fit_top

    monkeypatch.setattr(fit_top, "TOP_MIN_STEPS", 4)  # a few epochs are enough to check the row
    args = ["compare", "--data", photos, "--model", "tiny", "--model", "tiny@stage1+top", "--sample", "12",
            "--folds", "3", "--out", tmp_path / "c", "--json"]  # fmt: skip
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    rows = {row["candidate"]: row for row in json.loads(r.stdout)["rows"]}
    top = rows["tiny@stage1+top"]
    assert not top["error"] and top["layer"] == "stage1+top" and top["head_mean"] is not None
    assert top["probe_mean"] is None and top["fit_s"] > 0 and rows["tiny"]["probe_mean"] is not None
    assert top["full_disk_bytes"] == 24 * 6 * 28 * 28 * 2  # the 24 training images' float16 activations
