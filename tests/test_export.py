"""export: every head as a model that runs without flowerfeat, with the probabilities predict gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

import flowerfeat
from flowerfeat import train
from flowerfeat.cli import app
from flowerfeat.config import FitConfig
from conftest import blobs, make_folder, make_image, vgg_preprocessing, vgg_transform, vgg_trunk, write_features

runner = CliRunner()


def _head(tmp, dim: int, **meta) -> Path:
    """A head on hand-made rows that claim to be random-init VGG16 features (classes daisy/roses/tulips)."""
    x, y = blobs(10, dim=dim)
    path = write_features(
        tmp / "train.h5", x, y, classes=("daisy", "roses", "tulips"), preprocessing=vgg_preprocessing(), **meta
    )
    cfg = FitConfig(features=path)
    res, feature_meta = train.fit(cfg)
    return train.Head.from_fit(res, feature_meta, cfg).save(tmp / "head.pt")


def test_torchvision_format_is_vgg16_with_the_layer_in_classifier_6(tmp_path):
    head = _head(tmp_path, 4096)
    r = runner.invoke(app, ["export", str(tmp_path / "vgg.pth"), "--head", str(head)])
    assert r.exit_code == 0 and "(torchvision)" in r.output, r.output
    side = json.loads((tmp_path / "vgg.pth.json").read_text())
    assert side["classes"] == ["daisy", "roses", "tulips"] and side["preprocessing"]["crop_size"] == [224]
    model = torchvision.models.vgg16(num_classes=3)  # plain torchvision, no flowerfeat involved
    model.load_state_dict(torch.load(tmp_path / "vgg.pth", weights_only=True))
    model.eval()
    ck = train.Head.load(head)
    trunk = vgg_trunk("fc7")
    x = torch.stack([vgg_transform()(make_image(c, 0, (64, 48))) for c in range(3)])
    with torch.inference_mode():
        expected = trunk(x) @ ck.weight.T + ck.bias
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # same ops; only summation order may differ


def test_what_cannot_be_exported_is_refused_before_anything_else(tmp_path, monkeypatch):
    # the head's weights file is gone, yet the first complaint is the one that no --weights would fix
    head = _head(tmp_path, 512, layer="pool5-gap", weights="file:gone.pth:sha256=ab", weights_path="/nowhere/gone.pth")
    r = runner.invoke(app, ["export", str(tmp_path / "vgg.pth"), "--head", str(head)])
    assert (
        r.exit_code == 2
        and "vgg16 pool5-gap features; a torchvision state dict holds a head on the rows the model's own last layer "
        "takes (vgg16's is fc7)" in r.output
    )
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "onnxscript" else object())
    r = runner.invoke(app, ["export", str(tmp_path / "m.onnx"), "--head", str(head)])
    assert (
        r.exit_code == 2
        and "ONNX export needs onnxscript; install the extra: pip install 'flowerfeat[onnx]'" in r.output
    )
    r = runner.invoke(app, ["export", str(tmp_path / "model.bin"), "--head", str(head)])
    assert r.exit_code == 2 and "say which format with --format" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "m.pt2"), "--head", str(head)])  # exportable: now the weights
    assert r.exit_code == 2 and "no longer at /nowhere/gone.pth; pass --weights PATH" in r.output
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob("vgg.*"))


@pytest.fixture(scope="module")
def pool5_gap(tmp_path_factory):
    """A head on real VGG16 pool5-gap features (random weights) of a tiny folder, and its test images."""
    tmp = tmp_path_factory.mktemp("exp")
    data = make_folder(tmp / "d", {"train": 3, "test": 1})
    # fp32 as the exported models run (auto would take bf16 on a CPU with native bf16)
    files = flowerfeat.extract(data, tmp / "f", layer="pool5-gap", weights="none", batch_size=6, workers=0, precision="fp32")
    head = flowerfeat.fit_head(files["train"], epochs=2).save(tmp / "head.pt")
    return head, sorted((data / "test").rglob("*.*"))


def _predicted(head: Path, images) -> np.ndarray:
    """flowerfeat predict's probabilities, (N, C) in the head's class order."""
    preds = flowerfeat.Classifier.load(head).predict(images, top_k=3)
    classes = train.Head.load(head).classes
    return np.array([[dict(p.top)[c] for c in classes] for p in preds])


def _inputs(images) -> torch.Tensor:
    from flowerfeat.data import load_image

    return torch.stack([vgg_transform()(load_image(p)) for p in images])  # as the JSON describes


def test_pt2_and_onnx_give_predicts_probabilities_and_describe_themselves(pool5_gap, tmp_path):
    import onnx
    import onnxruntime

    head, images = pool5_gap
    x = _inputs(images)
    for suffix in (".pt2", ".onnx"):  # the same name, two formats: each keeps its own description
        r = runner.invoke(app, ["export", str(tmp_path / f"m{suffix}"), "--head", str(head)])
        assert r.exit_code == 0, r.output
        assert r.output.startswith(f"head {head}: vgg16 pool5-gap")  # which head was exported
    for suffix in (".pt2", ".onnx"):
        side = json.loads((tmp_path / f"m{suffix}.json").read_text())
        assert side["format"] == suffix[1:] and side["file"] == f"m{suffix}" and side["layer"] == "pool5-gap"
        assert side["output"]["is"] == "probabilities"
    got = {".pt2": torch.export.load(tmp_path / "m.pt2").module()(x).detach().numpy()}
    got[".onnx"] = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    for probabilities in got.values():
        np.testing.assert_allclose(probabilities, _predicted(head, images), atol=1e-4, rtol=0)
        assert probabilities.shape == (len(images), 3)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).metadata_props}
    assert json.loads(props["classes"]) == ["daisy", "roses", "tulips"]  # the output's order, in the file itself
    assert json.loads(props["preprocessing"])["crop_size"] == [224]


def test_a_pt2_model_loads_in_a_process_without_flowerfeat(pool5_gap, tmp_path):
    head, images = pool5_gap
    flowerfeat.export_model(head, tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", _inputs(images).numpy())
    code = (
        "import sys, numpy, torch; m = torch.export.load(sys.argv[1]).module(); "
        "p = m(torch.from_numpy(numpy.load(sys.argv[2]))); "
        "assert not any(k.startswith('flowerfeat') for k in sys.modules); print(p.argmax(1).tolist())"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.pt2"), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == _predicted(head, images).argmax(1).tolist()
