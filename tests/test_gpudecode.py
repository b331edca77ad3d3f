"""The GPU decode path, exercised on the CPU: same images kept and skipped, features that agree with PIL's."""

from __future__ import annotations

import io

import numpy as np

from flowerfeat import store
from flowerfeat.gpudecode import gpu_eligible
from conftest import make_image
from test_data import write_corpus
from test_extract import extract


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_only_plain_complete_jpegs_go_to_the_gpu(tmp_path):
    img = make_image(0, 0, (64, 48))
    cases = {
        "rgb.jpg": (_jpeg(img), True),
        "gray.jpg": (_jpeg(img.convert("L")), True),
        "cmyk.jpg": (_jpeg(img.convert("CMYK")), False),
        "progressive.jpg": (_jpeg(img, progressive=True), False),
        "truncated.jpg": (_jpeg(img)[:400], False),
        "png.jpg": (_png(img), False),
        "empty.jpg": (b"", False),
    }
    for name, (data, ok) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert (gpu_eligible(tmp_path / name) is not None) == ok, name


def test_gpu_decode_path_falls_back_cleanly_without_cuda(folder, tmp_path, tiny_trunk):
    # device="cpu": torchvision.io decodes on the CPU here, the same code that runs on CUDA elsewhere
    write_corpus(folder / "train" / "daisy")
    cpu = extract(folder, tmp_path / "cpu", tiny_trunk, decode="cpu", device="cpu")
    gpu = extract(folder, tmp_path / "gpu", tiny_trunk, decode="gpu", device="cpu")
    assert gpu["train"].rows == cpu["train"].rows
    assert store.read_skipped(tmp_path / "gpu" / "train.h5") == store.read_skipped(tmp_path / "cpu" / "train.h5")
    a = store.load_features(tmp_path / "cpu" / "train.h5")
    b = store.load_features(tmp_path / "gpu" / "train.h5")
    assert a.paths == b.paths and b.meta["decoder"] == "torchvision.io" and a.meta["decoder"] == "pil"
    assert a.meta["model_key"] != b.meta["model_key"]  # the decoder is part of the cache key
    cos = (a.features * b.features).sum(1) / (np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1))
    assert cos.mean() > 0.999 and cos.min() > 0.99, (cos.mean(), cos.min())
