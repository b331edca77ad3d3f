"""Every backbone family through the product path: features -> fit-head -> predict (and export), random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowerfeat import store
from flowerfeat.cli import app
from conftest import make_folder, write_features

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("photos") / "flowers", {"train": 2, "test": 1})


def _features_fit_predict(photos, tmp_path, model: str, layer: str | None = None):
    """The three commands a user runs, for ``model``; returns the test feature file and the head."""
    out, head = tmp_path / "features", tmp_path / "runs" / "head.pt"
    args = ["features", "--data", photos, "--out", out, "--model", model, "--weights", "none", "--workers", "0"]
    r = run(*args, *(["--layer", layer] if layer else []))
    assert r.exit_code == 0, r.output
    folder = store.cache_folders(out)[0]
    r = run("fit-head", "--features", out, "--out", head)  # no --model: the files say which
    assert r.exit_code == 0, r.output
    r = run("predict", photos / "test", "--head", head, "--top-k", "2")
    assert r.exit_code == 0, r.output
    assert len([line for line in r.output.splitlines() if line.startswith(str(photos))]) == 3
    return folder / "test.h5", head


# a small member of each torchvision family
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_32"])
def test_every_torchvision_family_extracts_fits_and_predicts(photos, tmp_path, model):
    test_file, head = _features_fit_predict(photos, tmp_path, model)
    meta = store.read_meta(test_file)
    from flowerfeat.backbones import get_backbone

    cut = get_backbone(model).cut(None)
    assert meta["model"] == model and meta["layer"] == "pre-logits" == cut.name and meta["feature_dim"] == cut.dim
    assert test_file.parent.name == f"{model}-pre-logits-random"  # the model names the cache folder
    r = run("report", "--head", head)
    assert r.exit_code == 0 and "Test Accuracy (Overall)" in r.output, r.output


def test_timm_plugin_extracts_fits_and_predicts(photos, tmp_path):
    pytest.importorskip("timm")
    test_file, _head = _features_fit_predict(photos, tmp_path, "timm:tf_efficientnet_lite0")
    meta = store.read_meta(test_file)
    assert meta["feature_dim"] == 1280 and meta["preprocessing"]["interpolation"] == "bicubic"
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # timm's data config, not VGG16's


def test_a_registered_backbone_is_chosen_by_name_with_its_cuts(photos, tmp_path):
    for layer, dim, dropout in (("grid", 24, 0.25), ("mean", 6, 0.0)):
        test_file, head = _features_fit_predict(photos, tmp_path / layer, "tiny", layer)
        meta = store.read_meta(test_file)
        assert (meta["model"], meta["layer"], meta["feature_dim"], meta["cut_dropout"]) == ("tiny", layer, dim, dropout)
        h = torch.load(head, weights_only=True)
        assert json.loads(h["meta"])["metrics"]["dropout"] == dropout  # the head's default: the cut's own dropout


def test_two_models_with_the_same_weights_tag_keep_apart(photos, tmp_path):
    out = tmp_path / "features"
    for model in ("tiny", "resnet18"):
        r = run("features", "--data", photos, "--out", out, "--model", model, "--weights", "none", "--workers", "0")
        assert r.exit_code == 0, r.output
    keys = {d.name: store.read_meta(d / "train.h5")["model_key"] for d in store.cache_folders(out)}
    assert set(keys) == {"tiny-grid-random", "resnet18-pre-logits-random"} and len(set(keys.values())) == 2
    r = run("fit-head", "--features", out, "--model", "tiny", "--out", tmp_path / "h.pt")
    assert r.exit_code == 0 and "tiny grid, 24-d" in r.output, r.output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet5"], "unknown model 'resnet5'; close matches: resnet50"),
        (["--model", "resnet18", "--layer", "fc7"], "resnet18 has no layer 'fc7'; choose one of: pre-logits"),
        (["--model", "tiny", "--weights", "nope.pth"], "nope.pth: weights file not found"),
    ],
)
def test_bad_model_choices_exit_2_in_one_line_and_write_nothing(photos, tmp_path, argv, message):
    out = tmp_path / "features"
    r = run("features", "--data", photos, "--out", out, *argv)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_a_cache_from_before_the_model_choice_is_refused_in_one_line(tmp_path):
    old = write_features(tmp_path / "train.h5", *_rows(), format_version=1)
    r = run("fit-head", "--features", old, "--out", tmp_path / "h.pt")
    assert r.exit_code == 2, r.output
    assert "made by an earlier flowerfeat (feature format 1" in r.output and "extract again" in r.output


def _rows():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 8)).astype(np.float32), np.arange(12) % 3


def test_models_lists_cuts_dimensions_and_costs():
    r = run("models", "resnet1*")
    assert r.exit_code == 0, r.output
    assert "resnet18" in r.output and "pre-logits (512)" in r.output and "1.81" in r.output  # torchvision's GFLOPs
    r = run("models", "squeezenet1_*")  # a model that cannot be cut is listed with why, the listing goes on
    assert r.exit_code == 0 and r.output.count("not usable: SqueezeNet: no Linear classifier") == 2, r.output
    rows = json.loads(run("models", "vgg16", "--json").output)
    assert rows[0]["cuts"][0] == {"layer": "fc7", "dim": 4096, "dropout": 0.5, "about": rows[0]["cuts"][0]["about"]}
    assert rows[0]["gflops"] == pytest.approx(15.47) and rows[0]["imagenet_top1"] == pytest.approx(71.592)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_another_family_exports_with_predicts_probabilities(photos, tmp_path, suffix):
    import flowerfeat
    from flowerfeat.data import load_image

    out, head = tmp_path / "features", tmp_path / "head.pt"
    r = run("features", "--data", photos, "--out", out, "--model", "mobilenet_v3_small", "--weights", "none",
            "--workers", "0", "--precision", "fp32")  # fp32 as the exported models compute  # fmt: skip
    assert r.exit_code == 0, r.output
    assert run("fit-head", "--features", out, "--out", head).exit_code == 0
    r = run("export", tmp_path / f"m{suffix}", "--head", head)
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / f"m{suffix}.json").read_text())
    assert side["model"] == "mobilenet_v3_small" and side["input"]["shape"] == ["batch", 3, 224, 224]
    images = sorted((photos / "test").rglob("*.*"))
    clf = flowerfeat.Classifier.load(head)
    x = torch.stack([clf._transform(load_image(p)) for p in images])
    if suffix == ".pt2":
        got = torch.export.load(tmp_path / "m.pt2").module()(x).detach().numpy()
    else:
        import onnxruntime

        got = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    want = np.array([[dict(p.top)[c] for c in clf.classes] for p in clf.predict(images, top_k=3)])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_a_torchvision_models_pre_logits_head_exports_as_its_own_state_dict(photos, tmp_path):
    import torchvision

    out, head = tmp_path / "features", tmp_path / "head.pt"
    r = run("features", "--data", photos, "--out", out, "--model", "resnet18", "--weights", "none", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert run("fit-head", "--features", out, "--out", head).exit_code == 0
    assert run("export", tmp_path / "r.pth", "--head", head).exit_code == 0
    model = torchvision.models.get_model("resnet18", num_classes=3)  # plain torchvision loads it
    model.load_state_dict(torch.load(tmp_path / "r.pth", weights_only=True))
    h = torch.load(head, weights_only=True)
    assert torch.equal(model.fc.weight, h["weight"]) and torch.equal(model.fc.bias, h["bias"])


def test_a_bare_name_of_another_familys_model_is_suggested_with_its_prefix():
    pytest.importorskip("timm")
    r = run("features", "--model", "tf_efficientnet_lite0")
    assert r.exit_code == 2 and "close matches: timm:tf_efficientnet_lite0" in r.output, r.output


def test_models_remembers_its_rows_until_a_download_folder_changes(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from flowerfeat import catalogue

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torchvision's download folder, for this test
    first = run("models", "resnet1*").output
    assert catalogue.remembered("resnet1*") is not None
    code = "import sys; from flowerfeat import catalogue; r = catalogue.remembered('resnet1*'); " \
           "print(len(r), 'torch' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)).stdout
    assert out.split() == ["3", "False"]  # resnet18, resnet101, resnet152  # printed again at once: torch is not even imported
    assert run("models", "resnet1*").output == first
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)  # a download lands: offline may have changed
    assert catalogue.remembered("resnet1*") is None
