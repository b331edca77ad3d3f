"""fit-head --train-top: the top of a tiny two-stage model trained on cached activations (and augmented views), then
report, predict and export through the same doors as a linear head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import flowerfeat
from flowerfeat import store
from flowerfeat.cli import app
from conftest import Bottom, TinyBackbone, cached, make_folder

runner = CliRunner()


def run(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Activations of the tiny model's first stage, with one augmented view per training image."""
    from flowerfeat import backbones

    backbones.register("tiny", TinyBackbone)  # before the per-test fixture does: this one serves the module
    tmp = tmp_path_factory.mktemp("top")
    data = make_folder(tmp / "d", {"train": 4, "test": 2})
    run("features", "--data", data, "--out", tmp / "f", "--model", "tiny", "--layer", "stage1", "--weights", "none",
        "--workers", "0", "--views", "1")  # fmt: skip
    return data, cached(tmp / "f", data, "tiny-stage1-random")


def test_activations_are_cached_float16_with_their_views(stage1):
    _data, folder = stage1
    tr = store.load_features(folder / "train.h5")
    assert tr.meta["dtype"] == "float16" and tr.X.shape == (24, 6 * 28 * 28) and sorted(set(tr.views)) == [0, 1]
    assert tr.meta["view_scale"] == 0.25  # the views' crop scale is recorded (and keyed)


def test_the_top_trains_on_the_cache_alone_and_serves_every_command(stage1, tmp_path):
    data, folder = stage1
    Bottom.calls = 0
    r = run("fit-head", "--features", folder, "--train-top", "--epochs", "3", "--out", tmp_path / "top.pt")
    assert Bottom.calls == 0, "training the top ran the bottom"
    assert "Settings: top the 1x1 conv and its pool" in r.output and "Epoch 3 done" in r.output
    head = flowerfeat.Head.load(tmp_path / "top.pt")
    assert head.kind == "top" and head.metrics["best_epoch"] == 3 and head.metrics["dropout"] == 0.1
    start = flowerfeat.Classifier.load(tmp_path / "top.pt")  # the trained top differs from the model's own
    assert not torch.equal(head.module.top.mix.weight, start.trunk().module.trunk.mix.weight)
    report = run("report", "--head", tmp_path / "top.pt", "--json")
    test = store.load_features(folder / "test.h5")
    ev = json.loads(report.stdout)
    assert ev["overall"]["correct"] == int((head.predict(test.X) == test.y).sum()) and ev["overall"]["total"] == 6
    images = [f"{test.meta['data_root']}/{p}" for p in test.paths]
    clf = flowerfeat.Classifier.load(tmp_path / "top.pt")
    want = np.array([[dict(p.top)[c] for c in clf.classes] for p in clf.predict(images, top_k=3)])
    np.testing.assert_allclose(want, head.predict_proba(test.X), atol=1e-3)  # rows stored float16: to 1e-3
    x = torch.stack([clf._transform(flowerfeat.data.load_image(p)) for p in images])
    for suffix in (".pt2", ".onnx"):  # bottom + top + head, one model
        run("export", tmp_path / f"m{suffix}", "--head", tmp_path / "top.pt")
    got = torch.export.load(tmp_path / "m.pt2").module()(x).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
    import onnxruntime

    got = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_the_same_seed_gives_the_same_checkpoint_in_memory_or_streamed(stage1, tmp_path):
    _data, folder = stage1
    for name, seed, memory in (("a", 0, "4"), ("b", 0, "4"), ("c", 1, "4"), ("d", 0, "0.0001")):
        run("fit-head", "--features", folder, "--train-top", "--epochs", "2", "--seed", seed, "--max-memory", memory,
            "--out", tmp_path / f"{name}.pt")  # fmt: skip
    a, b, c, d = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abcd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "meta")
    assert not torch.equal(a["linear.weight"], c["linear.weight"])
    streamed = flowerfeat.Head.load(tmp_path / "d.pt").metrics  # 0.0001 GiB: read from disk block by block
    assert streamed["streamed"] and not flowerfeat.Head.load(tmp_path / "a.pt").metrics["streamed"]
    assert all(torch.equal(a[k], d[k]) for k in a if k != "meta")


def test_a_pooled_cut_has_no_top_to_train(stage1, tmp_path):
    data, folder = stage1
    run("features", "--data", data, "--out", tmp_path / "f", "--model", "tiny", "--weights", "none", "--workers", "0")
    r = run("fit-head", "--features", tmp_path / "f", "--train-top", code=2)
    assert "tiny grid features have no top above them to train; extract a cut below the top (for tiny: stage1)" in r.output


def test_the_top_trains_in_bf16_only_where_its_cut_asks_and_the_trunk_ran_bf16(stage1, tmp_path, monkeypatch):
    from dataclasses import replace

    _data, folder = stage1
    rows = store.load_features(folder / "train.h5")
    cuts = TinyBackbone.cuts
    monkeypatch.setattr(TinyBackbone, "cuts", lambda self: {**cuts(self), "stage1": replace(cuts(self)["stage1"], top_bf16=True)})
    for precision, want in (("bf16", "bf16"), ("fp32", "fp32")):
        made = store.Features(rows.X, rows.y, rows.classes, rows.paths, rows.views, [], {**rows.meta, "precision": precision})
        head = flowerfeat.fit_head(made, epochs=1, train_top=True)
        assert head.metrics["top_precision"] == want


def test_a_small_set_trains_the_top_for_more_epochs_unless_asked(stage1, monkeypatch):
    from flowerfeat import fit_top
    from flowerfeat.fit_top import default_epochs

    assert default_epochs(7_707, 64) == 4  # the shared photos with 2 views: the default epochs
    assert default_epochs(400, 64) == -(-fit_top.TOP_MIN_STEPS // 7)  # 7 steps an epoch: at least TOP_MIN_STEPS
    monkeypatch.setattr(fit_top, "TOP_MIN_STEPS", 6)  # the tiny set's one step an epoch: 6 epochs, quickly
    _data, folder = stage1
    rows = store.load_features(folder / "train.h5")
    head = flowerfeat.fit_head(rows, train_top=True)
    n = int(rows.meta.get("rows", len(rows.y)))
    assert head.metrics["epochs"] == len(head.meta["history"]) == default_epochs(n, 64) > 4
    assert head.meta["config"]["epochs"] == head.metrics["epochs"]  # the head records what ran
    assert flowerfeat.fit_head(rows, epochs=2, train_top=True).metrics["epochs"] == 2


def test_a_cut_may_declare_its_tops_share_of_the_learning_rate(stage1, monkeypatch):
    from dataclasses import replace

    from flowerfeat.fit_top import TOP_LR_RATIO

    _data, folder = stage1
    rows = store.load_features(folder / "train.h5")
    assert flowerfeat.fit_head(rows, epochs=1, train_top=True, lr=0.01).metrics["top_lr"] == 0.01 * TOP_LR_RATIO
    cuts = TinyBackbone.cuts
    monkeypatch.setattr(TinyBackbone, "cuts", lambda self: {**cuts(self), "stage1": replace(cuts(self)["stage1"], top_lr_ratio=0.05)})
    assert flowerfeat.fit_head(rows, epochs=1, train_top=True, lr=0.01).metrics["top_lr"] == 0.01 * 0.05


def test_the_device_trains_the_top_but_does_not_name_the_head(stage1, tmp_path):
    from flowerfeat.config import FitConfig
    from flowerfeat.heads import head_name

    _data, folder = stage1
    cpu = FitConfig(features=folder, train_top=True, device="cpu")
    assert head_name(cpu, "f") == head_name(cpu.replace(device="auto"), "f") != head_name(cpu.replace(seed=1), "f")
    run("fit-head", "--features", folder, "--train-top", "--epochs", "1", "--device", "cpu", "--out", tmp_path / "a.pt")
    assert flowerfeat.Head.load(tmp_path / "a.pt").metrics["device"] == "cpu"
    if not torch.cuda.is_available():
        r = run("fit-head", "--features", folder, "--train-top", "--device", "cuda", "--out", tmp_path / "b.pt", code=2)
        assert "--device cuda: CUDA is not available here" in r.output and not (tmp_path / "b.pt").exists()
