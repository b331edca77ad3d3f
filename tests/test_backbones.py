"""The backbone registry: VGG16's cuts and weights files, torchvision's and timm's models, bad choices refused."""

from __future__ import annotations

import pytest
import torch

from flowerfeat import backbones, runtime
from flowerfeat.backbones.vgg import CONV_IDX, VGG16, Trunk
from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import WeightsInfo
from conftest import make_image

NONE = WeightsInfo("none", "none")


@pytest.fixture(scope="module")
def vgg():
    return VGG16().load_vgg16(NONE, "fc7")


def test_each_vgg16_cut_has_its_documented_dimension(vgg):
    x = torch.randn(2, 3, 224, 224)
    outs = {}
    for name, cut in VGG16().cuts().items():
        with torch.inference_mode():  # pool4: below the conv5 block, the map flattened
            outs[name] = torch.flatten(vgg.features[:24](x), 1) if name == "pool4" else Trunk(vgg, name).eval()(x)
        assert outs[name].shape == (2, cut.dim) and torch.isfinite(outs[name]).all(), name
    assert (outs["fc7"] >= 0).all() and (outs["fc6"] >= 0).all()  # after ReLU
    # pool5-gap is the per-channel mean of pool5's 512 x 7 x 7 map
    torch.testing.assert_close(outs["pool5-gap"], outs["pool5"].view(2, 512, 49).mean(2))
    with torch.inference_mode():  # fc6 is the first classifier layer applied to pool5
        torch.testing.assert_close(outs["fc6"], torch.relu(vgg.classifier[0](outs["pool5"])))
    assert VGG16().default_cut == "fc7" and VGG16().cut("fc7").dropout == 0.5 and VGG16().cut("pool5").dropout == 0


def test_random_init_is_reproducible_and_frozen():
    a, b = (backbones.get_backbone("vgg16").build(NONE, "pool5-gap") for _ in range(2))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_preprocessing_comes_from_the_weights():
    from torchvision.models import ResNet50_Weights, VGG16_Weights

    pre = VGG16().preprocessing(NONE)
    assert pre.resize_size == (256,) and pre.crop_size == (224,) and pre.interpolation == "bilinear"
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    img = make_image(0, 0, (61, 40))
    assert torch.equal(pre.transform()(img), VGG16_Weights.IMAGENET1K_V1.transforms()(img))
    r50 = backbones.get_backbone("resnet50").preprocessing(NONE)
    assert r50.resize_size == tuple(ResNet50_Weights.DEFAULT.transforms().resize_size) == (232,)


def _torchvision_transform(pre: backbones.Preprocessing):
    """The eval transform as torchvision's own steps compute it: what flowerfeat's must equal value for value."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(list(pre.resize_size), interpolation=T.InterpolationMode(pre.interpolation)),
        T.CenterCrop(list(pre.crop_size)), T.PILToTensor(), T.ConvertImageDtype(torch.float),
        T.Normalize(pre.mean, pre.std),
    ])  # fmt: skip


def test_a_batch_of_pixels_normalised_is_the_transform_bit_for_bit():
    """The reader sends uint8 pixels and normalises a batch at once: the very values torchvision's per-image
    transform gives."""
    pre = backbones.get_backbone("resnet50").preprocessing(NONE)
    images = [make_image(k, k % 3, (70 + 9 * k, 50 + 5 * k)) for k in range(4)]
    pixels = torch.stack([pre.pixels()(img) for img in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, *pre.input_shape)
    assert torch.equal(pre.normalize(pixels), torch.stack([_torchvision_transform(pre)(img) for img in images]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"])
@pytest.mark.parametrize("resize, crop", [((256,), (224,)), ((40,), (36, 30)), ((48, 64), (40,)), ((20,), (33,))])
def test_the_transform_is_torchvisions_without_importing_it(interpolation, resize, crop):
    """Landscape, portrait and square images; a shorter side resized or both sides squashed; a crop larger than
    the resized image (centred in zeros, odd margins); an image already at the resize size (no resampling)."""
    pre = backbones.Preprocessing(resize, crop, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interpolation)
    sizes = [(61, 40), (40, 61), (50, 50), (45, 91), (256, 300), (20, 20), (64, 48)]
    for k, size in enumerate(sizes):
        img = make_image(k % 3, k, size)
        assert torch.equal(pre.transform()(img), _torchvision_transform(pre)(img)), size


def test_the_transform_imports_no_torchvision():
    import subprocess
    import sys

    code = ("import sys; from PIL import Image; from flowerfeat.backbones import Preprocessing as P; "
            "P((256,), (224,), (0.5,) * 3, (0.2,) * 3, 'bicubic').transform()(Image.new('RGB', (300, 200))); "
            "print(any(m.startswith('torchvision') for m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_features_only_state_dict_serves_pool5_but_not_fc7(vgg, tmp_path):
    path = tmp_path / "conv_only.pth"
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    model = VGG16()
    info = model.resolve_weights(str(path))
    assert info.kind == "file" and len(info.sha256) == 64
    torch.testing.assert_close(model.load_vgg16(info, "pool5").features[0].weight, vgg.features[0].weight)
    # the default layer (fc7) asked of a conv-only file: what the file serves, and the way out
    with pytest.raises(FlowerfeatError, match=r"has the weights of --layer pool5, pool5-gap, pool4 but not of fc7 "
                       r"\(no classifier\.0\.weight\); pass --layer pool5-gap"):  # fmt: skip
        model.load_vgg16(info, "fc7")


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda p: p.write_text("not torch"), "not a loadable state dict"),
        (lambda p: torch.save([1, 2, 3], p), "not a state dict of tensors"),
        (
            lambda p: torch.save({f"features.{i}.{w}": torch.zeros(2) for i in CONV_IDX for w in ("weight", "bias")}, p),
            r"features\.0\.weight has shape \(2,\), vgg16 needs \(64, 3, 3, 3\)",
        ),
    ],
)
def test_bad_weights_files_are_refused(tmp_path, content, message):
    path = tmp_path / "w.pth"
    content(path)
    with pytest.raises(FlowerfeatError, match=message):
        VGG16().load_vgg16(VGG16().resolve_weights(str(path)), "pool5")


def test_missing_weights_file_names_the_ways_out(tmp_path):
    with pytest.raises(FlowerfeatError, match="weights file not found.*--weights imagenet.*--weights none"):
        VGG16().resolve_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(FlowerfeatError, match="is a directory, not a weights file; pass --weights PATH"):
        VGG16().resolve_weights(str(tmp_path))


def test_offline_download_names_both_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: torchvision must download

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for name in ("vgg16", "resnet18"):
        model = backbones.get_backbone(name)
        with pytest.raises(
            FlowerfeatError, match=rf"could not download {name} weights from https://download\.pytorch\.org/.*--weights PATH"
        ):
            model.build(model.resolve_weights("imagenet"), model.default_cut)


def test_a_state_dict_of_another_architecture_names_the_missing_keys(tmp_path):
    path = tmp_path / "vgg_as_resnet.pth"
    torch.save({f"features.{i}.weight": torch.zeros(1) for i in CONV_IDX}, path)
    model = backbones.get_backbone("resnet18")
    with pytest.raises(FlowerfeatError, match=r"missing conv1\.weight, bn1\.weight.*needed for --layer pre-logits"):
        model.build(model.resolve_weights(str(path)), "pre-logits")


def test_torchvision_cuts_are_read_off_the_model():
    mobilenet = backbones.get_backbone("mobilenet_v3_small")
    assert {n: (c.dim, c.dropout) for n, c in mobilenet.cuts().items()} == {
        "pre-logits": (1024, 0.2), "pool": (576, 0), "features.8": (48 * 14 * 14, 0)  # the last stages' input
    }  # fmt: skip
    assert mobilenet.cut("features.8").top_dropout == 0.2  # its own classifier's, before the last Linear
    assert list(backbones.get_backbone("resnet18").cuts()) == ["pre-logits", "layer3"]  # fc follows the pool directly
    assert backbones.get_backbone("vit_b_16").cut(None).dim == 768
    trunk = mobilenet.build(NONE, "pool")
    with torch.inference_mode():
        assert trunk(torch.randn(1, 3, 224, 224)).shape == (1, 576)


def test_bad_model_choices_are_refused_in_one_line():
    with pytest.raises(FlowerfeatError, match="unknown model 'resnet5'; close matches: resnet50"):
        backbones.get_backbone("resnet5")
    with pytest.raises(FlowerfeatError, match="vgg16 has no layer 'fc8'; choose one of: fc7, fc6, pool5, pool5-gap"):
        backbones.get_backbone("vgg16").cut("fc8")


def test_timm_without_the_extra_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    monkeypatch.setattr(backbones, "_BUILT", {})  # as in a fresh process
    with pytest.raises(FlowerfeatError, match=r"needs timm; install the extra: pip install 'flowerfeat\[timm\]'"):
        backbones.get_backbone("timm:tf_efficientnet_lite0")


def test_timm_model_preprocessing_matches_timm_and_its_state_dict_loads(tmp_path):
    timm = pytest.importorskip("timm")
    model = backbones.get_backbone("timm:tf_efficientnet_lite0")
    pre = model.preprocessing(NONE)
    assert (pre.resize_size, pre.crop_size, pre.interpolation, pre.mean) == ((256,), (224,), "bicubic", (0.5,) * 3)
    reference = timm.data.create_transform(**timm.data.resolve_model_data_config(timm.create_model("tf_efficientnet_lite0")))
    img = make_image(1, 0, (90, 61))
    torch.testing.assert_close(pre.transform()(img), reference(img), atol=1e-6, rtol=0)
    full = timm.create_model("tf_efficientnet_lite0")  # with its classifier, as the shared file has it
    torch.save(full.state_dict(), tmp_path / "lite0.pth")
    trunk = model.build(model.resolve_weights(str(tmp_path / "lite0.pth")), "pre-logits")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(trunk(x), full.eval().forward_head(full.forward_features(x), pre_logits=True))
    assert model.cut(None).dim == 1280 and model.cut(None).dropout == full.drop_rate == 0  # timm creates it without


def test_precision_auto():
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert runtime.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    expected = "bf16" if runtime.cpu_has_bf16() else "fp32"
    assert runtime.resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.onnxruntime
def test_timm_same_padding_is_fixed_for_tracing_with_the_same_values(tmp_path):
    """TF-style 'same' padding traced as it is costs ONNX Runtime a dozen shape operators per convolution; fixed for the
    input size, the graph has none and the values stay the same."""
    pytest.importorskip("timm")
    import onnx
    from timm.layers import Conv2dSame

    model = backbones.get_backbone("timm:tf_efficientnet_lite0")
    trunk = torch.nn.Sequential(Conv2dSame(3, 4, 3, stride=2), torch.nn.ReLU(), Conv2dSame(4, 5, 5, stride=2))
    shape = (3, 19, 22)  # odd sizes: the padding is uneven
    fixed = model.for_tracing(trunk, shape)
    assert not any(isinstance(m, Conv2dSame) for m in fixed.modules())
    assert any(isinstance(m, Conv2dSame) for m in trunk.modules())  # the caller's trunk is left as it was
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(fixed(x), trunk(x))
    runtime.export_onnx(fixed, shape, tmp_path / "t.onnx")
    assert "Shape" not in {n.op_type for n in onnx.load(tmp_path / "t.onnx").graph.node}
    with torch.no_grad():
        torch.testing.assert_close(runtime.OnnxModel(tmp_path / "t.onnx")(x), trunk(x), atol=1e-5, rtol=1e-5)
