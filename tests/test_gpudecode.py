"""The GPU decode path, exercised on the CPU: same images kept and skipped, features that agree with PIL's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flowerfeat import backbone, store
from flowerfeat.gpudecode import GpuPreprocess, RawUnitDataset, _chunks, apply_orientation, collate_raw, gpu_eligible
from flowerfeat.data import scan_data
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
    assert gpu_eligible(tmp_path / "rgb.jpg")[1:] == (1, 64 * 48)  # (bytes, orientation, pixels)


# PIL's exif_transpose method for each EXIF orientation
PIL_METHOD = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation):
    # nvjpeg ignores EXIF orientation, so the GPU path applies it to the decoded tensor itself
    a = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    want = Image.fromarray(a)
    if orientation in PIL_METHOD:
        want = want.transpose(PIL_METHOD[orientation])
    got = apply_orientation(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_gpu_path_applies_exif_orientation_like_pil(tmp_path, orientation):
    img = make_image(0, 1, (96, 64))
    exif = Image.Exif()
    exif[0x0112] = orientation
    root = tmp_path / "d"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        img.save(root / split / "a" / "r.jpg", "JPEG", quality=95, exif=exif.tobytes())
    split = scan_data(root, ("train",))["train"]
    transform = backbone.build_transform()
    ds = RawUnitDataset(split, [0], 0, transform, None, 0)
    assert ds[0][0][1] == orientation
    x, ids, skipped = GpuPreprocess(torch.device("cpu"), transform)(collate_raw([ds[0]]))
    from flowerfeat.data import load_image

    want = transform(load_image(root / "train" / "a" / "r.jpg"))  # PIL path: exif_transpose + transforms()
    assert ids == [0] and not skipped and x.shape == (1, *want.shape)
    assert (x[0] - want).abs().mean() < 0.02  # resampling differs slightly; a wrong rotation differs by ~1


def test_chunks_bound_the_pixels_decoded_at_once():
    assert _chunks([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert _chunks([], 8) == []


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


@pytest.mark.parametrize("hw", [(300, 400), (375, 500), (500, 333), (224, 224), (60, 90)])
def test_resize_is_transforms_resize_and_centre_crop(hw):
    from torchvision.transforms.v2 import functional as F

    transform = backbone.build_transform()
    x = torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8)
    want = F.center_crop(F.resize(x.float(), list(transform.resize_size), antialias=True), list(transform.crop_size))
    got = GpuPreprocess(torch.device("cpu"), transform)._resize(x)
    assert got.shape == (2, 3, 224, 224)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_threaded_preparation_keeps_the_loader_order(folder):
    # batches() prepares on several threads but must hand the batches over in the loader's order, each intact
    split = scan_data(folder, ("train",))["train"]
    transform = backbone.build_transform()
    ds = RawUnitDataset(split, list(range(len(split.items))), 0, transform, None, 0)
    raw = [collate_raw([ds[i] for i in range(s, min(s + 3, len(ds)))]) for s in range(0, len(ds), 3)]
    pre = GpuPreprocess(torch.device("cpu"), transform)
    one_by_one = [pre(b) for b in raw]
    threaded = list(pre.batches(iter(raw), threads=3))
    assert len(threaded) == len(raw) > 3
    for (x, ids, skipped), (x1, ids1, skipped1) in zip(threaded, one_by_one):
        assert ids == ids1 and skipped == skipped1 and torch.equal(x, x1)
    assert sorted(u for _x, ids, _s in threaded for u in ids) == list(range(len(split.items)))
