"""The scripts keep working on the package as it is (the tiny model, synthetic rows): gpu_check.py's CPU smoke path,
head_vs_probe.py's cross-validation, int8_as_avx2.py's settings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]


def test_gpu_check_runs_its_cpu_smoke_path(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    r = gpu_check.main(["--smoke", "--model", "tiny", "--n", "40", "--copies", "1", "--batch", "8", "--steps",
                        "warm,parts,agreement,top", "--top-images", "10", "--out", str(tmp_path)])  # fmt: skip
    assert "errors" not in r, r["errors"]
    assert r["top"]["cut"] == "stage1" and r["top"]["rows"] == 30 and len(r["top"]["epoch_s"]) == 2
    assert r["warm"]["hybrid"]["rows"] == r["warm"]["gpu"]["rows"] == r["synth"]["train_files"] == 38
    assert r["repeat_max_abs_diff"] == 0 and r["agreement_synthetic_hybrid"]["min"] > 0.999
    assert (tmp_path / "gpu_check.json").is_file()


def test_the_gpu_payload_travels_small_and_the_real_step_reads_it(tmp_path, monkeypatch):
    """gpu_payload.py's folder (the test photos, float16 weights) is what gpu_check.py's real step takes: VGG16 pool5
    by both decode modes against the CPU fp32 path (on the CPU here)."""
    import timm
    import torch
    from torchvision.models import vgg16

    from conftest import make_folder

    shared = tmp_path / "shared"
    make_folder(shared / "data" / "flower_photos", {"train": 1, "test": 2})
    (shared / "weights").mkdir()
    torch.save({f"features.{k}": v for k, v in vgg16().features.state_dict().items()},
               shared / "weights" / "vgg16_imagenet_features.pth")  # fmt: skip
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    torch.save(lite0.state_dict(), shared / "weights" / "tf_efficientnet_lite0_imagenet.pth")
    _script("gpu_payload", monkeypatch).main([str(shared), str(tmp_path / "payload")])
    photos = sorted((tmp_path / "payload" / "photos" / "test").rglob("*.*"))
    assert len(photos) == len(list((shared / "data" / "flower_photos" / "test").rglob("*.*")))
    weights = tmp_path / "payload" / "weights" / "vgg16_imagenet_features.pth"
    assert {v.dtype for v in torch.load(weights, weights_only=True).values()} == {torch.float16}
    gpu_check = _script("gpu_check", monkeypatch)
    r = gpu_check.main(["--smoke", "--model", "tiny", "--n", "20", "--copies", "1", "--batch", "8", "--steps", "real",
                        "--photos", str(tmp_path / "payload" / "photos"), "--weights", str(weights),
                        "--real-ref", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    assert "errors" not in r, r["errors"]
    n_classes = len(list((tmp_path / "payload" / "photos" / "test").iterdir()))
    assert r["real_extract"]["rows"] == r["real_hybrid_extract"]["rows"] == len(photos)
    assert r["real_hybrid_vs_cpu_fp32"]["images"] == n_classes and r["real_hybrid_vs_cpu_fp32"]["min"] > 0.99


def _script(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_head_vs_probe_cross_validates_over_the_centre_crops_of_both_splits(tmp_path, monkeypatch, capsys):
    from conftest import blobs, write_features

    x, y = blobs(20, seed=3)
    views = np.tile(np.array([0, 1], np.int8), 30)  # every other training row an augmented view: left out of folds
    write_features(tmp_path / "train.h5", x, y, views=views, layer="pool5-gap")
    xt, yt = blobs(6, seed=3, noise_seed=1)
    write_features(tmp_path / "test.h5", xt, yt, layer="pool5-gap")
    head_vs_probe = _script("head_vs_probe", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["head_vs_probe.py", str(tmp_path), "--seeds", "0", "--folds", "3"])
    head_vs_probe.main()
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("3-fold cross-validation over 48 images: default head 100.00 %"), line  # 30 + 18
    assert "C=0.1 100.00 %" in line and line.endswith("+0.0, +0.0, +0.0")


@pytest.mark.onnxruntime
def test_int8_as_avx2_makes_the_rows_a_cpu_without_vnni_would(folder, tmp_path, monkeypatch, capsys):
    from flowerfeat import quantize, store

    monkeypatch.setattr(quantize, "cpu_flags", quantize.cpu_flags)  # the script replaces it: put back afterwards
    monkeypatch.setattr(sys, "argv", ["int8_as_avx2.py", str(folder), str(tmp_path / "f"), "--model", "tiny",
                                      "--weights", "none"])  # fmt: skip
    _script("int8_as_avx2", monkeypatch).main()
    (train,) = (tmp_path / "f").glob("*/*/train.h5")
    settings = store.read_meta(train)["quantization"]
    assert settings["reduce_range"] is True and settings["activations"] == "uint8" and settings["weights"] == "int8"


@pytest.mark.onnxruntime
def test_int8_variants_quantizes_each_way_and_its_first_is_flowerfeats(folder, tmp_path, monkeypatch):
    from flowerfeat import quantize, runtime

    variants = _script("int8_variants", monkeypatch)
    argv = [str(folder), "--model", "tiny", "--calibration", "6", "--test", "4", "--batch", "2", "--reduce-range", "on"]
    results = variants.main(argv)
    assert len(results) == 7 and all(-1.0 <= r["cosine_min"] <= r["cosine_median"] <= 1.0 for r in results.values())
    assert all(r["images_per_s"] > 0 for r in results.values())
    # its first variant is what `features --precision int8` makes: quantize.quantize on the same sample, same rows
    trunk, pre = variants.built("tiny", None, "none")
    calib, test = variants.samples(folder, pre, 6, 4)
    settings = quantize.Settings("uint8", "int8", True, "minmax", True, 6, 0, "any")
    quantize.quantize(trunk, pre.input_shape, calib, settings, tmp_path / "int8.onnx", batch=2)
    runtime.export_onnx(trunk, pre.input_shape, tmp_path / "fp32.onnx")
    fp32, int8 = (variants.rows(runtime.OnnxModel(tmp_path / f), test, 2) for f in ("fp32.onnx", "int8.onnx"))
    ours = results["QDQ, per-channel s8 weights (flowerfeat)"]
    assert variants.cosines(fp32, int8).min() == pytest.approx(ours["cosine_min"], abs=1e-6)
