"""--precision int8: a quantized trunk on ONNX Runtime, calibrated once per cache and kept beside the features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import flowerfeat
from flowerfeat import quantize, runtime, store
from flowerfeat.cli import app
from flowerfeat.errors import FlowerfeatError
from flowerfeat.progress import Reporter
from conftest import extract, make_folder


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.onnxruntime
def test_int8_features_record_their_quantization_and_agree_with_fp32(folder, tmp_path):
    fp32 = extract(folder, tmp_path / "a", precision="fp32")
    int8 = extract(folder, tmp_path / "b", precision="int8", calibration=6)
    meta = store.read_meta(int8["train"].path)
    assert meta["precision"] == "int8" and meta["engine"] == "onnxruntime"
    assert meta["quantization"]["calibration"] == 6 and meta["quantization"]["activations"] == "uint8"
    kept = store.engine_files(int8["train"].path.parent, "int8")
    assert meta["quantized_model"]["path"] == str(kept.model.resolve()) and kept.model.is_file()
    assert len(kept.read_record()["calibration_images"]) == 6  # the seeded sample, named
    speed = kept.read_record()["speed"]  # int8 against fp32, measured on this CPU when it was made
    assert speed["int8_over_fp32"] == speed["int8_images_per_s"] / speed["fp32_images_per_s"] > 0
    a, b = store.load_features(fp32["train"].path), store.load_features(int8["train"].path)
    assert a.paths == b.paths and cosines(a.X, b.X).min() > 0.98 and not np.array_equal(a.X, b.X)
    again = extract(folder, tmp_path / "b", precision="int8", calibration=6)
    assert again["train"].status == again["test"].status == "up to date"
    kept.model.write_bytes(kept.model.read_bytes()[:1000])  # cut short: the next run makes it again, the same file
    again = extract(folder, tmp_path / "b", precision="int8", calibration=6)
    assert again["train"].status == "up to date" and "trunk-int8.onnx was missing or damaged: made again" in again[
        "train"
    ].reason
    assert kept.intact(meta["quantization"]) == meta["quantized_model"]["sha256"]


class StopAfter(Reporter):
    """Interrupts an extraction after its first batches, as Ctrl-C would."""

    def __init__(self, batches: int):
        self.left = batches

    def update(self, p):
        super().update(p)
        if p.done > p.start_done:
            self.left -= 1
            if self.left < 0:
                raise KeyboardInterrupt


@pytest.mark.onnxruntime
def test_a_resumed_int8_run_equals_an_uninterrupted_one(folder, tmp_path):
    whole = extract(folder, tmp_path / "whole", precision="int8", calibration=6)
    with pytest.raises(KeyboardInterrupt):
        flowerfeat.extract(folder, tmp_path / "cut", weights="none", model="tiny", batch_size=4, workers=0,
                           precision="int8", calibration=6, progress=StopAfter(2))  # fmt: skip
    resumed = extract(folder, tmp_path / "cut", precision="int8", calibration=6)
    assert resumed["train"].status == "resumed"
    for split in ("train", "test"):
        a, b = store.load_features(whole[split].path), store.load_features(resumed[split].path)
        assert a.paths == b.paths and np.array_equal(a.X, b.X)  # bit for bit


@pytest.mark.onnxruntime
def test_predict_runs_the_very_int8_trunk_the_features_came_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "d", {"train": 3, "test": 1})
    run = CliRunner().invoke
    r = run(app, ["features", "--data", str(data), "--model", "tiny", "--precision", "int8", "--calibration", "6",
                  "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0 and "quantizing the trunk to int8 (6 calibration images" in r.output, r.output
    assert run(app, ["fit-head"]).exit_code == 0
    head = flowerfeat.Head.load(store.heads_under(tmp_path / "data" / "features")[0])
    test = store.load_features(store.find_features(tmp_path / "data" / "features", "test"))
    preds = flowerfeat.Classifier.load(head).predict([data / p for p in test.paths], top_k=3)
    got = np.array([[dict(p.top)[c] for c in head.classes] for p in preds])
    np.testing.assert_allclose(got, head.predict_proba(test.X), atol=1e-5)
    r = run(app, ["export", str(tmp_path / "m.onnx")])  # the same quantized trunk, the head after it
    assert r.exit_code == 0, r.output
    import onnxruntime

    x = np.stack([clf_input(head, data / p) for p in test.paths])
    exported = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(exported, head.predict_proba(test.X), atol=1e-5)


def clf_input(head, path) -> np.ndarray:
    """One image preprocessed as the head's features were."""
    from flowerfeat.backbones import Preprocessing
    from flowerfeat.data import load_image

    return Preprocessing.from_dict(head.meta["features"]["preprocessing"]).transform()(load_image(path)).numpy()


def test_int8_is_refused_where_it_cannot_run(folder, tmp_path):
    with pytest.raises(FlowerfeatError, match="--precision int8 runs on the CPU"):
        runtime.resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(FlowerfeatError, match=r"--precision int8 needs onnxruntime; install the extra"):
        runtime.resolve_engine("auto", torch.device("cpu"), "int8")  # the [onnx] extra "missing" (conftest)
    with pytest.raises(FlowerfeatError, match="runs on the onnxruntime engine; drop --engine torch"):
        runtime.resolve_engine("torch", torch.device("cpu"), "int8")


@pytest.mark.onnxruntime
def test_a_calibration_sample_smaller_than_the_classes_is_refused(folder, tmp_path):
    with pytest.raises(FlowerfeatError, match="calibration .* of 2 images is smaller than the 3 classes"):
        extract(folder, tmp_path / "f", precision="int8", calibration=2)
    assert not list((tmp_path / "f").rglob("*.h5"))


def test_int8_says_in_one_line_where_it_measured_slower_than_fp32():
    slow = {"speed": {"int8_images_per_s": 25.5, "fp32_images_per_s": 35.4, "int8_over_fp32": 0.72, "images": 16}}
    assert quantize.slower_note(slow) == (
        "note: int8 runs at 0.72x fp32's speed on this CPU (25.5 against 35.4 images/s, measured when it was made); "
        "--precision fp32 is faster here"
    )
    fast = {"speed": {"int8_images_per_s": 60.0, "fp32_images_per_s": 40.0, "int8_over_fp32": 1.5, "images": 16}}
    assert quantize.slower_note(fast) is None and quantize.slower_note({}) is None  # older records: nothing said
