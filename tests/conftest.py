"""Tiny synthetic ImageFolders and a tiny trunk, so every test runs offline in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

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


class TinyTrunk(nn.Module):
    """A stand-in for the VGG16 trunk: same interface (B, 3, 224, 224) -> (B, D), milliseconds per batch."""

    feature_dim = 24
    identity = "tiny-trunk-v1"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, kernel_size=8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2), 1)  # (B, 24)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "flowers")


@pytest.fixture
def tiny_trunk() -> TinyTrunk:
    return TinyTrunk().eval()


def write_features(
    path: Path, x: np.ndarray, y: np.ndarray, classes=("a", "b", "c"), views=None, **meta_changes
) -> Path:
    """A hand-built finished feature file (no trunk involved), for the trainer and the report."""
    from flowerfeat import store

    return store.write_arrays(path, x, y, classes, views, **meta_changes)


def blobs(n_per_class: int, dim: int = 16, n_classes: int = 3, seed: int = 0, spread: float = 1.0):
    """Gaussian blobs: linearly separable classes with a known structure."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)
