"""Tiny synthetic ImageFolders and a tiny trunk, so every test runs offline in seconds."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from flowerfeat.backbones import Backbone, Cut, stage_cut
from flowerfeat.backbones.vgg import VGG16
from flowerfeat.weights import WeightsInfo, load_state_dict, resolve_local

COLOURS = {"daisy": (230, 230, 60), "roses": (200, 30, 40), "tulips": (60, 60, 210)}


def make_image(cls_index: int, i: int, size: tuple[int, int]) -> Image.Image:
    """A class-dependent colour plus stripes whose direction also depends on the class; noise varies per image."""
    rng = np.random.default_rng(1000 * cls_index + i)
    w, h = size
    base = np.array(list(COLOURS.values())[cls_index % len(COLOURS)], float)
    img = np.clip(rng.normal(0, 20, (h, w, 3)) + base, 0, 255)
    stripes = (np.arange(w)[None, :] if cls_index % 2 else np.arange(h)[:, None]) // 6 % 2
    img *= (0.7 + 0.3 * stripes)[..., None]
    return Image.fromarray(img.astype(np.uint8), "RGB")


def make_folder(root: Path, per_class: dict[str, int] | None = None, classes=tuple(COLOURS)) -> Path:
    """root/{train,test}/<class>/ with JPEG and PNG images of non-square sizes."""
    per_class = per_class or {"train": 6, "test": 3}
    for split, n in per_class.items():
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (40 + 8 * (i % 3), 26 + 5 * ((i + c) % 4))  # non-square, varied
                ext = "jpg" if i % 2 == 0 else "png"
                make_image(c, i + (100 if split == "test" else 0), size).save(d / f"{split}_{cls}_{i}.{ext}")
    return root


# the cache folder the tiny model's features go to: <model>-<layer>-<weights tag>
TINY = "tiny-grid-random"


class TinyTrunk(nn.Module):
    """A stand-in for a real trunk: the same interface (B, 3, 224, 224) -> (B, 24), milliseconds per batch; two
    stages, so a top can train above the first."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, kernel_size=8, stride=8)  # stage 1: (B, 6, 28, 28)
        self.mix = nn.Conv2d(6, 6, kernel_size=1)  # stage 2, the top
        with torch.no_grad():
            for conv in (self.conv, self.mix):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
                conv.bias.zero_()

    def bottom(self, x):
        return self.conv(x)

    def top(self, a):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.mix(torch.relu(a))), 2), 1)

    def forward(self, x):
        return self.top(self.bottom(x))  # (B, 24)


class TinyBackbone(Backbone):
    """A backbone registered as a user would (``backbones.register``): the tiny trunk cut at its 2 x 2 grid or its
    channel means, VGG16's preprocessing, random weights or a state dict of its own."""

    name, family = "tiny", "tests"

    def __init__(self, trunk_class=TinyTrunk):
        self.trunk_class = trunk_class  # a TinyTrunk that crashes, sleeps, ... (``tiny_runs``)

    def cuts(self):
        return {
            "grid": Cut("grid", 24, 0.25, "2 x 2 pooled"),
            "mean": Cut("mean", 6, 0.0, "averaged"),
            "stage1": stage_cut("stage1", (6, 28, 28), "the 1x1 conv and its pool", 24, 0.1, "the first conv's map"),
        }

    def split(self, weights, cut, with_top=True):
        trunk = self.load(weights, "grid")
        return Bottom(trunk), (Top(trunk) if with_top else None)

    def resolve_weights(self, weights):
        return resolve_local("none" if weights == "imagenet" else weights, self.name)

    def preprocessing(self, weights):
        return VGG16().preprocessing(weights)

    def load(self, weights, cut):
        trunk = self.trunk_class()
        if weights.kind == "file":
            trunk.load_state_dict(load_state_dict(weights.path, self.name))
        return trunk if cut == "grid" else nn.Sequential(trunk, nn.Unflatten(1, (6, 4)), MeanLast())


class Bottom(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    calls = 0  # every bottom's batches, counted: training the top never runs the bottom

    def forward(self, x):
        Bottom.calls += 1
        return torch.flatten(self.trunk.bottom(x), 1)


class Top(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.mix = trunk.mix

    def forward(self, a):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.mix(torch.relu(a))), 2), 1)


class MeanLast(nn.Module):
    def forward(self, x):
        return x.mean(-1)  # (B, 6, 4) -> (B, 6)


@pytest.fixture(autouse=True)
def tiny_backbone():
    """``--model tiny`` for every test, registered through the same door as any backbone."""
    from flowerfeat import backbones

    backbones.register("tiny", TinyBackbone)
    yield
    backbones.unregister("tiny")


@pytest.fixture(autouse=True)
def torch_engine_unless_asked(request, monkeypatch):
    """Tests run the torch engine (exporting VGG16 to ONNX costs seconds a run) unless marked onnxruntime; auto's
    choice by measurement (fastest.py) only where a test asks for it, so results do not depend on the
    machine's CPU."""
    from flowerfeat import fastest, runtime

    if "onnxruntime" not in request.keywords:
        monkeypatch.setattr(runtime, "engine_available", lambda engine: engine == "torch")
    if "fastest" not in request.keywords:
        monkeypatch.setattr(fastest, "needed", lambda *a: False)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "flowers")


@contextlib.contextmanager
def tiny_runs(trunk_class):
    """In this block ``--model tiny`` runs ``trunk_class`` (same key: a crash, a pause, an interrupt in its forward)."""
    from flowerfeat import backbones

    backbones.register("tiny", lambda: TinyBackbone(trunk_class))
    try:
        yield
    finally:
        backbones.register("tiny", TinyBackbone)


def write_features(
    path: Path, x: np.ndarray, y: np.ndarray, classes=("a", "b", "c"), views=None, **meta_changes
) -> Path:
    """A hand-built finished feature file (no trunk involved), for the trainer and the report. Defaults describe
    random-init VGG16 fc7 features; ``meta_changes`` overrides any attribute."""
    from flowerfeat import FORMAT_VERSION
    from flowerfeat.store import fingerprint, model_key, write_feature_file

    n = len(y)
    meta = {
        "format_version": FORMAT_VERSION,
        "split": path.stem,
        "classes": list(classes),
        "model": "vgg16",
        "layer": "fc7",
        "feature_dim": int(x.shape[1]),
        "cut_dropout": 0.5,
        "weights": "none:random-init-seed-0",
        "weights_sha256": "",
        "preprocessing": {"crop_size": [224]},
        "decoder": "pil",
        "precision": "fp32",
        "engine": "torch",
        "dtype": "float32",
        "views": 0,
        "view_seed": 0,
        "data_root": str(path.parent),
        "library_versions": {},
        "extract_config": {},
        **meta_changes,
    }
    if "cut_dropout" not in meta_changes:  # the dropout VGG16's own classifier applies at the layer
        meta["cut_dropout"] = VGG16().cuts()[meta["layer"]].dropout if meta["layer"] in VGG16().cuts() else 0.0
    meta["model_key"] = model_key(meta)
    meta["fingerprint"] = fingerprint(meta, [(f"img{i}", int(t)) for i, t in enumerate(y)])
    columns = {
        "labels": y,
        "paths": [f"{path.stem}/{classes[t]}/img{i // (1 + meta['views'])}.jpg" for i, t in enumerate(y)],
        "views": np.zeros(n, np.int8) if views is None else views,
        "file_sizes": np.ones(n),
        "file_mtimes_ns": np.ones(n),
    }
    write_feature_file(path, meta, n, [(0, x.astype(meta["dtype"]))], columns, [])
    return path


def blobs(n_per_class: int, dim: int = 16, n_classes: int = 3, seed: int = 0, spread: float = 1.0, noise_seed=None):
    """Gaussian blobs: linearly separable classes with a known structure. The centres come from ``seed``; another
    ``noise_seed`` draws other points around the same centres (a held-out set)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    if noise_seed is not None:
        rng = np.random.default_rng([seed, noise_seed])
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)


def extract(folder, out, **kw):
    """run_extraction of the tiny model (random init), batches of 4, no reader processes; by split."""
    from flowerfeat.config import ExtractConfig
    from flowerfeat.extraction import run_extraction

    cfg = ExtractConfig(data=folder, out=out, **{"model": "tiny", "weights": "none", "batch_size": 4, "workers": 0, **kw})
    return {r.split: r for r in run_extraction(cfg)}


# -- the bad-image corpus: (file name, bytes maker, expected: "ok" or a fragment of the skip reason) --------------


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP, over Pillow's limit); no need for real pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 30))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return _save(img, "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("P", (32, 24), i * 40) for i in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return png_bytes(img, transparency=0)


BASE = make_image(0, 0, (48, 36))
CORPUS = [
    ("zero.jpg", lambda: b"", "empty file"),
    ("truncated.jpg", lambda: _save(BASE, "JPEG")[:300], "corrupt or truncated"),
    ("text.jpg", lambda: b"this is not an image\n" * 20, "not an image"),
    ("png_named.jpg", lambda: png_bytes(BASE), "ok"),
    ("rgba.png", lambda: png_bytes(BASE.convert("RGBA")), "ok"),
    ("palette_transparent.png", _palette_with_transparency, "ok"),
    ("gray.jpg", lambda: _save(BASE.convert("L"), "JPEG"), "ok"),
    ("cmyk.jpg", lambda: _save(BASE.convert("CMYK"), "JPEG"), "ok"),
    (
        "gray16.png",
        lambda: png_bytes(Image.fromarray((np.arange(48 * 36).reshape(36, 48) * 37).astype(np.uint16))),
        "ok",
    ),
    ("animated.gif", _animated_gif, "ok"),
    ("image.webp", lambda: _save(BASE, "WEBP"), "ok"),
    ("image.bmp", lambda: _save(BASE, "BMP"), "ok"),
    ("image.tiff", lambda: _save(BASE, "TIFF"), "ok"),
    ("exif_rotated.jpg", exif_rotated_jpeg, "ok"),
    ("one_pixel.png", lambda: png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))), "ok"),
    ("bomb.png", _bomb_png, "decompression bomb"),
]


def write_corpus(d: Path) -> dict[str, str]:
    """Write every corpus file (plus a non-UTF-8 name) into ``d``; returns name -> expectation."""
    d.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, make, outcome in CORPUS:
        (d / name).write_bytes(make())
        expected[name] = outcome
    bad_name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 byte: not valid UTF-8
    (d / bad_name).write_bytes(_save(BASE, "JPEG"))
    expected[bad_name] = "not valid UTF-8"
    return expected


RANDOM = WeightsInfo("none", "none")


def vgg_transform():
    """VGG16's eval transform (its weights' own)."""
    return VGG16().preprocessing(RANDOM).transform()


def vgg_pre():
    """VGG16's preprocessing record."""
    return VGG16().preprocessing(RANDOM)


def vgg_trunk(layer: str = "fc7"):
    """Random-init VGG16 cut at ``layer``, frozen."""
    return VGG16().build(RANDOM, layer)


def vgg_preprocessing() -> dict:
    """VGG16's preprocessing as a feature file records it."""
    return VGG16().preprocessing(RANDOM).to_dict()


def cached(out, data, trunk: str = TINY) -> Path:
    """The cache folder of ``trunk`` for the data set ``data`` under ``out``: <out>/<data set>/<trunk>."""
    from flowerfeat.store import dataset_tag

    return Path(out) / dataset_tag(data) / trunk


@pytest.fixture(autouse=True)
def own_user_cache(tmp_path, monkeypatch):
    """What `flowerfeat models` remembers goes to the test's own folder, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
