"""Engines: onnxruntime runs the same trunk as torch, agrees with it, and is keyed and chosen without recomputing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flowerfeat
from flowerfeat import runtime, store
from flowerfeat.errors import FlowerfeatError
from conftest import extract, make_folder


def test_auto_picks_onnxruntime_only_where_it_can_run(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "engine_available", lambda e: True)
    assert runtime.resolve_engine("auto", cpu, "fp32") == "onnxruntime"
    assert (
        runtime.resolve_engine("auto", cpu, "bf16") == "torch"
        and runtime.resolve_engine("auto", cuda, "bf16") == "torch"
    )
    assert (
        runtime.resolve_engine("auto", cpu, "fp32", previous="torch") == "torch"
    )  # the cache's engine: no re-extraction
    with pytest.raises(FlowerfeatError, match="runs on the CPU in fp32"):
        runtime.resolve_engine("onnxruntime", cuda, "bf16")
    monkeypatch.setattr(runtime, "engine_available", lambda e: e == "torch")
    assert runtime.resolve_engine("auto", cpu, "fp32", previous="onnxruntime") == "torch"  # not installed here
    with pytest.raises(FlowerfeatError, match=r"pip install 'flowerfeat\[onnx\]'"):
        runtime.resolve_engine("onnxruntime", cpu, "fp32")


def test_the_engine_and_the_model_are_in_the_cache_key():
    meta = {k: k for k in store.MODEL_KEY_FIELDS}
    assert store.model_key({**meta, "engine": "torch"}) != store.model_key({**meta, "engine": "onnxruntime"})
    assert store.model_key({**meta, "model": "vgg16"}) != store.model_key({**meta, "model": "resnet50"})


@pytest.mark.onnxruntime
def test_onnxruntime_features_agree_with_torch_and_are_keyed_apart(folder, tmp_path):
    ref = extract(folder, tmp_path / "f", engine="torch", precision="fp32")  # the engine runs fp32
    a = store.load_features(ref["train"].path)
    assert a.meta["engine"] == "torch"
    ort = extract(folder, tmp_path / "f", engine="onnxruntime", precision="fp32")
    assert ort["train"].computed == 18 and "engine torch -> onnxruntime" in ort["train"].reason
    b = store.load_features(ort["train"].path)
    assert b.meta["engine"] == "onnxruntime" and "onnxruntime" in b.meta["library_versions"]
    cos = (a.X * b.X).sum(1) / (np.linalg.norm(a.X, axis=1) * np.linalg.norm(b.X, axis=1))
    assert cos.min() > 0.99999 and np.abs(a.X - b.X).max() < 1e-4 * np.abs(a.X).max()
    again = extract(folder, tmp_path / "f", precision="fp32")  # auto: the cache's engine
    assert again["train"].status == "up to date"


@pytest.mark.onnxruntime
def test_the_onnxruntime_export_is_made_once_per_cache_and_made_again_when_damaged(folder, tmp_path, monkeypatch):
    from flowerfeat import recipe as recipe_module
    from flowerfeat.recipe import Recipe, onnx_settings

    first = extract(folder, tmp_path / "f", engine="onnxruntime", precision="fp32", splits=("train",))
    kept = store.engine_files(first["train"].path.parent, "fp32")
    meta = store.read_meta(first["train"].path)
    assert meta["quantized_model"] == {"path": str(kept.model.resolve()), "sha256": kept.read_record()["sha256"]}
    head = flowerfeat.fit_head(first["train"].path)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    test = extract(folder, tmp_path / "f", precision="fp32")["test"]  # another split: the kept file runs it
    assert test.status == "extracted" and store.read_meta(test.path)["quantized_model"] == meta["quantized_model"]
    image = folder / store.load_features(test.path).paths[0]

    def no_model(name):
        raise AssertionError("the model was looked up")

    # predict: nothing to prepare, and with the kept file intact neither the model's family nor its weights are needed
    monkeypatch.setattr(recipe_module, "get_backbone", no_model)
    assert flowerfeat.Classifier.load(head).predict(image)[0].label in head.classes
    monkeypatch.undo()

    kept.model.write_bytes(kept.model.read_bytes()[:1000])  # cut short
    assert flowerfeat.Classifier.load(head).predict(image)[0].label in head.classes  # the weights found, exported
    again = extract(folder, tmp_path / "f", precision="fp32")
    assert again["train"].status == "up to date" and "trunk-fp32.onnx was missing or damaged: made again" in again[
        "train"
    ].reason
    assert kept.intact(onnx_settings(Recipe.from_attrs(meta))) is not None


@pytest.mark.onnxruntime
@pytest.mark.fastest
def test_without_bf16_auto_measures_torch_fp32_against_onnxruntime_and_keeps_the_faster(folder, tmp_path, monkeypatch):
    from flowerfeat import fastest
    from flowerfeat import recipe as recipe_module

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    timed = []

    def measured(trunk, batch=fastest.BATCH):
        timed.append((trunk.recipe.engine, trunk.recipe.precision))
        return {"torch": 30.0, "onnxruntime": 10.0}[trunk.recipe.engine]  # as VGG16 might on an AVX2 CPU

    monkeypatch.setattr(fastest, "images_per_s", measured)
    loads, real_load = [], recipe_module._torch_trunk
    monkeypatch.setattr(recipe_module, "_torch_trunk", lambda *a: loads.append(1) or real_load(*a))
    first = extract(folder, tmp_path / "f", splits=("train",))
    meta = store.load_features(first["train"].path).meta
    assert sorted(timed) == [("onnxruntime", "fp32"), ("torch", "fp32")]
    assert len(loads) == 1  # the export measured traced the torch trunk measured: the weights loaded once
    assert (meta["engine"], meta["precision"]) == ("torch", "fp32")
    assert not store.engine_files(first["train"].path.parent, "fp32").model.exists()  # the losing export is gone


@pytest.mark.onnxruntime
@pytest.mark.fastest
def test_on_a_bf16_cpu_auto_measures_both_engines_once_and_runs_the_faster(folder, tmp_path, monkeypatch):
    from flowerfeat import fastest

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    timed, real = [], fastest.images_per_s
    speed = {"onnxruntime": 50.0, "torch": 20.0}

    def measured(trunk, batch=fastest.BATCH):
        assert real(trunk, 2) > 0  # the real timing runs on this very trunk
        timed.append(trunk.recipe.engine)
        return speed[trunk.recipe.engine]

    monkeypatch.setattr(fastest, "images_per_s", measured)
    first = extract(folder, tmp_path / "f", splits=("train",))
    meta = store.load_features(first["train"].path).meta
    assert (meta["engine"], meta["precision"]) == ("onnxruntime", "fp32") and sorted(timed) == ["onnxruntime", "torch"]
    assert store.engine_files(first["train"].path.parent, "fp32").model.is_file()  # the export measured is the one run
    kept = json.loads(store.user_cache(fastest.KEPT).read_text())
    assert [v["chosen"] for v in kept.values()] == [["onnxruntime", "fp32"]]

    speed.update(torch=99.0)  # a kept choice is not measured again, for another data set either
    other = extract(make_folder(tmp_path / "other"), tmp_path / "f", splits=("train",))
    assert store.load_features(other["train"].path).meta["engine"] == "onnxruntime" and len(timed) == 2

    store.user_cache(fastest.KEPT).unlink()  # measured afresh: torch bf16 wins now; the cache keeps its own engine
    assert extract(folder, tmp_path / "f", splits=("train",))["train"].status == "up to date" and len(timed) == 2
    third = extract(make_folder(tmp_path / "third"), tmp_path / "f", splits=("train",))
    meta = store.load_features(third["train"].path).meta
    assert (meta["engine"], meta["precision"]) == ("torch", "bf16") and len(timed) == 4
    assert not store.engine_files(third["train"].path.parent, "fp32").model.exists()  # the losing export is gone

    store.user_cache(fastest.KEPT).unlink()  # an export onnxruntime cannot take: torch runs, nothing fails
    real_build = fastest.build

    def no_onnx(recipe, **kw):
        if recipe.engine == "onnxruntime":
            raise RuntimeError("an operator the exporter lacks")
        return real_build(recipe, **kw)

    monkeypatch.setattr(fastest, "build", no_onnx)
    fourth = extract(make_folder(tmp_path / "fourth"), tmp_path / "f", splits=("train",))
    assert store.load_features(fourth["train"].path).meta["engine"] == "torch" and timed[-1] == "torch"
