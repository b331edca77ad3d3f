"""The GPU decode path, exercised on the CPU: same images kept and skipped, features that agree with PIL's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flowerfeat import store
from flowerfeat.config import ExtractConfig
from flowerfeat.layouts import scan_data
from flowerfeat.extraction import default_workers, run_extraction
from flowerfeat.recipe import decode_plan
from flowerfeat.gpudecode import (
    DecodedUnitDataset,
    GpuPreprocess,
    RawUnitDataset,
    _chunks,
    apply_orientation,
    collate_raw,
    gpu_eligible,
)
from conftest import cached, extract, make_image, vgg_pre, vgg_transform, write_corpus


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
    assert gpu_eligible(tmp_path / "progressive.jpg", progressive=True) is not None  # libjpeg takes those (hybrid)
    assert gpu_eligible(tmp_path / "cmyk.jpg", progressive=True) is None


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
    transform = vgg_transform()
    ds = RawUnitDataset(split, 0, transform, None, 0)
    assert ds[0][0][1] == orientation
    x, ids, skipped = GpuPreprocess(torch.device("cpu"), vgg_pre())(collate_raw([ds[0]]))
    from flowerfeat.data import load_image

    want = transform(load_image(root / "train" / "a" / "r.jpg"))  # PIL path: exif_transpose + transforms()
    assert ids == [0] and not skipped and x.shape == (1, *want.shape)
    torch.testing.assert_close(x[0], want, rtol=0, atol=1e-5)  # same decoder, same 8-bit resize: PIL's pixels


def test_chunks_bound_the_pixels_decoded_at_once():
    assert _chunks([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert _chunks([], 8) == []


def test_gpu_decode_path_falls_back_cleanly_without_cuda(folder, tmp_path):
    # device="cpu": torchvision.io decodes on the CPU here, the same code that runs on CUDA elsewhere
    write_corpus(folder / "train" / "daisy")
    cpu = extract(folder, tmp_path / "cpu", decode="cpu", device="cpu")
    gpu = extract(folder, tmp_path / "gpu", decode="gpu", device="cpu")
    assert gpu["train"].rows == cpu["train"].rows
    assert store.read_skipped(cached(tmp_path / "gpu", folder) / "train.h5") == store.read_skipped(
        cached(tmp_path / "cpu", folder) / "train.h5"
    )
    a = store.load_features(cached(tmp_path / "cpu", folder) / "train.h5")
    b = store.load_features(cached(tmp_path / "gpu", folder) / "train.h5")
    assert a.paths == b.paths and b.meta["decoder"] == "libjpeg" and a.meta["decoder"] == "pil"
    assert a.meta["model_key"] != b.meta["model_key"]  # the decoder is part of the cache key
    cos = (a.X * b.X).sum(1) / (np.linalg.norm(a.X, axis=1) * np.linalg.norm(b.X, axis=1))
    assert cos.mean() > 0.999 and cos.min() > 0.99, (cos.mean(), cos.min())


@pytest.mark.parametrize("hw", [(300, 400), (375, 500), (500, 333), (224, 224), (60, 90), (1000, 1500)])
def test_resize_and_crop_give_pils_pixels(hw):
    # transforms() resizes a PIL image in 8 bits, horizontal pass first; the device path does the same in floats, so
    # only PIL's fixed-point weights can move a value, by one grey level (upscaling: none at all). Rounding the float
    # result once instead puts every fifth value a level off.
    from torchvision.transforms.v2 import functional as F

    pre = vgg_pre()
    a = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    resized = F.resize(Image.fromarray(a), list(pre.resize_size), antialias=True)
    want = np.asarray(F.center_crop(resized, list(pre.crop_size)), dtype=np.float32)
    got = GpuPreprocess(torch.device("cpu"), pre)._resize(torch.from_numpy(a).permute(2, 0, 1)[None])
    assert got.shape == (1, 3, 224, 224)
    diff = np.abs(got[0].permute(1, 2, 0).numpy() - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())
    if min(hw) <= 256:
        assert diff.max() == 0


def test_threaded_preparation_keeps_the_loader_order(folder):
    # batches() prepares on several threads but must hand the batches over in the loader's order, each intact
    split = scan_data(folder, ("train",))["train"]
    transform = vgg_transform()
    ds = RawUnitDataset(split, 0, transform, None, 0)
    raw = [collate_raw([ds[i] for i in range(s, min(s + 3, len(ds)))]) for s in range(0, len(ds), 3)]
    pre = GpuPreprocess(torch.device("cpu"), vgg_pre())
    one_by_one = [pre(b) for b in raw]
    threaded = list(pre.batches(iter(raw), threads=3))
    assert len(threaded) == len(raw) > 3
    for (x, ids, skipped), (x1, ids1, skipped1) in zip(threaded, one_by_one):
        assert ids == ids1 and skipped == skipped1 and torch.equal(x, x1)
    assert sorted(u for _x, ids, _s in threaded for u in ids) == list(range(len(split.items)))


def _corrupt_jpeg() -> bytes:
    data = bytearray(_jpeg(make_image(0, 0, (64, 48))))
    data[400:408] = b"\0" * 8  # complete (SOI ... EOI), yet neither libjpeg nor PIL decodes it
    return bytes(data)


def test_hybrid_decodes_in_the_workers_with_the_gpu_modes_pixels(folder, tmp_path):
    # hybrid's workers decode with libjpeg, the decoder the gpu mode itself uses on a machine without CUDA, so here
    # the two must give the same rows, bit for bit; one worker sends the packed pixels through shared memory
    d = folder / "train" / "daisy"
    write_corpus(d)
    (d / "progressive.jpg").write_bytes(_jpeg(make_image(0, 2, (80, 60)), progressive=True))
    (d / "corrupt.jpg").write_bytes(_corrupt_jpeg())
    runs = {}
    for decode, workers in (("cpu", 0), ("gpu", 0), ("hybrid", 1)):
        cfg = ExtractConfig(
            data=folder, out=tmp_path / decode, model="tiny", weights="none", batch_size=4, workers=workers,
            decode=decode,
        )
        run_extraction(cfg)
        runs[decode] = store.load_features(cached(tmp_path / decode, folder) / "train.h5")
        runs[decode].skipped = store.read_skipped(cached(tmp_path / decode, folder) / "train.h5")
    cpu, gpu, hyb = runs["cpu"], runs["gpu"], runs["hybrid"]
    assert hyb.meta["decoder"] == gpu.meta["decoder"] == "libjpeg"
    assert hyb.paths == gpu.paths == cpu.paths and hyb.skipped == gpu.skipped == cpu.skipped
    assert any(p.endswith("corrupt.jpg") for p, _why in hyb.skipped)  # refused by libjpeg, then by PIL: skipped
    baseline = [not p.endswith("progressive.jpg") for p in hyb.paths]  # the gpu mode sends that one to PIL
    np.testing.assert_array_equal(hyb.X[baseline], gpu.X[baseline])
    cos = (hyb.X * cpu.X).sum(1) / (np.linalg.norm(hyb.X, axis=1) * np.linalg.norm(cpu.X, axis=1))
    assert cos.mean() > 0.999 and cos.min() > 0.99, (cos.mean(), cos.min())


def test_decoded_dataset_hands_over_pixels_and_falls_back_to_pil(tmp_path):
    root = tmp_path / "d"
    (root / "train" / "a").mkdir(parents=True)
    make_image(0, 1, (50, 30)).save(root / "train" / "a" / "a.jpg", "JPEG", quality=95)
    (root / "train" / "a" / "b.jpg").write_bytes(_corrupt_jpeg())
    make_image(0, 2, (40, 40)).convert("CMYK").save(root / "train" / "a" / "c.jpg", "JPEG")
    split = scan_data(root, ("train",))["train"]
    ds = DecodedUnitDataset(split, 0, vgg_transform(), None, 0)
    (pixels, orientation, n), tensor, unit, reason, _path = ds[0]
    assert pixels.shape == (30, 50, 3) and pixels.is_contiguous() and (orientation, n) == (1, 1500) and tensor is None
    assert ds[1][0] is None and ds[1][1] is None and "broken" in ds[1][3]  # skipped with PIL's reason
    assert ds[2][0] is None and ds[2][1].shape == (3, 224, 224)  # CMYK: prepared on the CPU by PIL
    batch = collate_raw([ds[i] for i in range(3)])
    assert batch.shapes == [(30, 50)] and batch.lengths == [30 * 50 * 3] and batch.cpu_units == [2]
    assert torch.equal(batch.blob.view(30, 50, 3), pixels)
    ds.max_image_pixels = 1000  # bigger images are prepared by PIL in the worker: bounded shared memory per batch
    assert ds[0][0] is None and ds[0][1].shape == (3, 224, 224)


def test_decode_plan_and_default_workers(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_plan("auto", cuda) == ("gpu", "nvjpeg") and decode_plan("auto", cpu) == ("cpu", "pil")
    assert decode_plan("gpu", cpu) == ("gpu", "libjpeg") and decode_plan("hybrid", cuda) == ("hybrid", "libjpeg")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [default_workers(m, cuda) for m in ("gpu", "hybrid", "cpu")] == [8, 14, 14]
    assert default_workers("hybrid", cpu) == 2  # reader threads beside a CPU trunk
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the node's 16 cores
    assert [default_workers(m, cuda) for m in ("gpu", "hybrid")] == [4, 2]
