"""VGG16 (weights=None) cut at each layer, weights-file validation, precision choice."""

from __future__ import annotations

import pytest
import torch

from flowerfeat import backbone
from flowerfeat.errors import FlowerfeatError


@pytest.fixture(scope="module")
def vgg():
    return backbone.load_vgg16(backbone.resolve_weights("none"), "fc7")


def test_each_cut_has_its_documented_dimension(vgg):
    x = torch.randn(2, 3, 224, 224)
    outs = {}
    for layer, dim in backbone.FEATURE_DIMS.items():
        trunk = backbone.Trunk(vgg, layer).eval()
        with torch.inference_mode():
            outs[layer] = trunk(x)
        assert outs[layer].shape == (2, dim) and torch.isfinite(outs[layer]).all(), layer
    assert (outs["fc7"] >= 0).all() and (outs["fc6"] >= 0).all()  # after ReLU
    # pool5-gap is the per-channel mean of pool5's 512 x 7 x 7 map
    torch.testing.assert_close(outs["pool5-gap"], outs["pool5"].view(2, 512, 49).mean(2))
    # fc6 is the first classifier layer applied to pool5
    with torch.inference_mode():
        torch.testing.assert_close(outs["fc6"], torch.relu(vgg.classifier[0](outs["pool5"])))


def test_random_init_is_reproducible_and_frozen():
    a = backbone.build_trunk(backbone.resolve_weights("none"), "pool5-gap")
    b = backbone.build_trunk(backbone.resolve_weights("none"), "pool5-gap")
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_transform_comes_from_the_weights():
    pre = backbone.preprocessing()
    assert pre["resize_size"] == [256] and pre["crop_size"] == [224]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]


def test_features_only_state_dict_serves_pool5_but_not_fc7(vgg, tmp_path):
    path = tmp_path / "conv_only.pth"
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    info = backbone.resolve_weights(str(path))
    assert info.kind == "file" and len(info.sha256) == 64
    model = backbone.load_vgg16(info, "pool5", str(path))
    torch.testing.assert_close(model.features[0].weight, vgg.features[0].weight)
    with pytest.raises(FlowerfeatError, match=r"missing classifier\.0\.weight.*needed for --layer fc7"):
        backbone.load_vgg16(info, "fc7", str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda p: p.write_text("not torch"), "not a loadable state dict"),
        (lambda p: torch.save([1, 2, 3], p), "not a state dict of tensors"),
        (
            lambda p: torch.save(
                {f"features.{i}.{w}": torch.zeros(2) for i in backbone._CONV_IDX for w in ("weight", "bias")}, p
            ),
            r"features\.0\.weight has shape \(2,\), VGG16 needs \(64, 3, 3, 3\)",
        ),
    ],
)
def test_bad_weights_files_are_refused(tmp_path, content, message):
    path = tmp_path / "w.pth"
    content(path)
    with pytest.raises(FlowerfeatError, match=message):
        backbone.load_vgg16(backbone.resolve_weights(str(path)), "pool5", str(path))


def test_missing_weights_file_names_the_ways_out(tmp_path):
    with pytest.raises(FlowerfeatError, match="weights file not found.*--weights imagenet.*--weights none"):
        backbone.resolve_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(FlowerfeatError, match="is a directory, not a weights file; pass --weights PATH"):
        backbone.resolve_weights(str(tmp_path))


def test_offline_download_names_both_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: torchvision must download

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(
        FlowerfeatError, match=r"could not download VGG16 weights from https://download\.pytorch\.org/.*--weights PATH"
    ):
        backbone.load_vgg16(backbone.resolve_weights("imagenet"), "fc7")


def test_precision_auto():
    assert backbone.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert backbone.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    expected = "bf16" if backbone.cpu_has_bf16() else "fp32"
    assert backbone.resolve_precision("auto", torch.device("cpu")) == expected
