"""The public API: what a notebook or script user calls, the types it returns, and the notebook that uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import flowerfeat
from flowerfeat import runtime, store
from flowerfeat.cli import app
from conftest import TinyTrunk, make_folder, tiny_runs

ROOT = Path(__file__).parents[1]


def test_the_public_names_are_exported_and_import_stays_light():
    for name in ("extract", "load_features", "fit_head", "Head", "evaluate", "Classifier", "FlowerfeatError"):
        assert name in dir(flowerfeat) and getattr(flowerfeat, name).__doc__, name
    code = "import sys, flowerfeat; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"flowerfeat {flowerfeat.__version__}"


@pytest.fixture
def files(folder, tmp_path):
    return flowerfeat.extract(folder, tmp_path / "f", weights="none", model="tiny", batch_size=4, workers=0)


def test_extract_load_fit_evaluate(files):
    assert set(files) == {"train", "test"} and files["train"].name == "train.h5"
    tr, te = flowerfeat.load_features(files["train"]), flowerfeat.load_features(files["test"])
    assert tr.X.dtype == np.float32 and tr.X.shape == (18, 24) and tr.y.dtype == np.int64
    assert tr.classes == ["daisy", "roses", "tulips"] and isinstance(tr.paths[0], str) and tr.skipped == []
    from sklearn.linear_model import LogisticRegression

    assert LogisticRegression(max_iter=200).fit(tr.X, tr.y).score(te.X, te.y) > 0.5  # scikit-learn takes it as is
    head = flowerfeat.fit_head(tr, epochs=2)
    p = head.predict_proba(te.X)
    assert p.shape == (9, 3) and np.allclose(p.sum(1), 1, atol=1e-6)
    assert (head.predict(te.X) == p.argmax(1)).all()
    ev = flowerfeat.evaluate(head, te)
    assert str(ev).startswith("Test Loss: ") and "Test Accuracy (Overall)" in str(ev)
    assert ev.correct == int((head.predict(te.X) == te.y).sum()) and ev.confusion_matrix.sum() == 9


def test_fit_head_on_a_file_equals_fit_head_on_loaded_features(files, tmp_path):
    a = flowerfeat.fit_head(files["train"], epochs=2, seed=3)
    b = flowerfeat.fit_head(flowerfeat.load_features(files["train"]), epochs=2, seed=3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    path = a.save(tmp_path / "runs" / "head.pt")
    c = flowerfeat.Head.load(path)
    assert torch.equal(c.weight, a.weight) and c.classes == a.classes and c.meta["config"]["seed"] == 3
    with pytest.raises(TypeError, match="unknown option.*drop_out"):
        flowerfeat.fit_head(files["train"], drop_out=0.1)


def test_evaluation_to_dict_is_what_report_json_prints(files, tmp_path):
    head = flowerfeat.fit_head(files["train"], epochs=2)
    head.save(tmp_path / "head.pt")
    r = CliRunner().invoke(
        app, ["report", "--features", str(files["test"]), "--head", str(tmp_path / "head.pt"), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads(json.dumps(flowerfeat.evaluate(head, files["test"]).to_dict()))
    r = CliRunner().invoke(app, ["report", "--features", str(files["test"]), "--head", str(tmp_path / "head.pt")])
    assert r.output.splitlines()[0] == flowerfeat.Head.load(tmp_path / "head.pt").source_line()  # which head answers
    assert r.output.split("\n", 1)[1].startswith(str(flowerfeat.evaluate(tmp_path / "head.pt", files["test"])))


def test_bad_input_raises_the_clis_one_line_error(tmp_path):
    with pytest.raises(flowerfeat.FlowerfeatError, match="data folder not found; run `flowerfeat download`"):
        flowerfeat.extract(tmp_path / "nope", tmp_path / "f")
    assert not (tmp_path / "f").exists()  # nothing written, not even the output folder
    with pytest.raises(flowerfeat.FlowerfeatError, match="feature file not found"):
        flowerfeat.load_features(tmp_path / "train.h5")
    with pytest.raises(TypeError, match="unknown option.*batchsize"):
        flowerfeat.extract(tmp_path, batchsize=4)


def test_an_interrupted_extract_resumes_on_the_next_call(folder, tmp_path):
    class Interrupted(TinyTrunk):
        calls = 0

        def forward(self, x):
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                raise KeyboardInterrupt  # what a notebook's "interrupt the kernel" raises
            return super().forward(x)

    kw = dict(model="tiny", weights="none", batch_size=4, workers=0)
    with pytest.raises(KeyboardInterrupt), tiny_runs(Interrupted):
        flowerfeat.extract(folder, tmp_path / "f", **kw)
    again = flowerfeat.extract(folder, tmp_path / "f", **kw)
    assert again.results["train"].status == "resumed" and again.results["train"].computed == 18 - 8
    fresh = flowerfeat.extract(folder, tmp_path / "g", **kw)
    np.testing.assert_array_equal(
        flowerfeat.load_features(again["train"]).X, flowerfeat.load_features(fresh["train"]).X
    )


def test_progress_lines_for_a_script(folder, tmp_path, capsys):
    flowerfeat.extract(folder, tmp_path / "f", model="tiny", weights="none", workers=0, progress=True)
    err = capsys.readouterr().err
    assert "scanning" in err and "18 train + 9 test images" in err
    assert "train: 18/18 images (100 %)" in err and "images/s" in err


@pytest.fixture(scope="module")
def vgg_head(tmp_path_factory):
    """A head on real VGG16 pool5-gap features (random weights) of a tiny folder."""
    tmp = tmp_path_factory.mktemp("vgg")
    data = make_folder(tmp / "d", {"train": 3, "test": 1})
    files = flowerfeat.extract(data, tmp / "f", layer="pool5-gap", weights="none", batch_size=6, workers=0)
    head = flowerfeat.fit_head(files["train"], epochs=2)
    return head, flowerfeat.load_features(files["test"]), head.save(tmp / "head.pt")


def test_classifier_takes_paths_pil_images_and_arrays(vgg_head):
    head, te, path = vgg_head
    files = [Path(te.meta["data_root"]) / p for p in te.paths]
    clf = flowerfeat.Classifier.load(path)
    preds = clf.predict(files, top_k=3)
    assert [p.path for p in preds] == [str(f) for f in files] and all(p.label in head.classes for p in preds)
    # the same images through trunk + head end to end give the probabilities of the cached features
    probs = np.array([[dict(p.top)[c] for c in head.classes] for p in preds])
    np.testing.assert_allclose(probs, head.predict_proba(te.X), atol=1e-4)
    img = Image.open(files[0])
    from_memory = clf.predict([img, np.asarray(img.convert("RGB"))])
    assert [p.label for p in from_memory] == [preds[0].label] * 2 and from_memory[0].path == "<image 0>"
    assert abs(from_memory[1].probability - preds[0].probability) < 1e-5
    bad = clf.predict([np.zeros((4, 4), np.float32)])[0]
    assert bad.label is None and "uint8" in bad.error


def test_classifier_batch_size_changes_speed_not_answers(vgg_head):
    _, te, path = vgg_head
    files = [Path(te.meta["data_root"]) / p for p in te.paths]
    clf = flowerfeat.Classifier.load(path)
    auto, ones = clf.predict(files), clf.predict(files, batch_size=1)
    assert [p.label for p in auto] == [p.label for p in ones]
    np.testing.assert_allclose([p.probability for p in auto], [p.probability for p in ones], atol=1e-5)
    with pytest.raises(flowerfeat.FlowerfeatError, match="--batch-size must be >= 0"):
        clf.predict(files, batch_size=-1)


def test_the_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    project = tmp_path / "project"  # a checkout: Jupyter started in examples/, the data at the default data/...
    (project / "examples").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    make_folder(project / "data" / "flower_photos", {"train": 3, "test": 1})
    nb = nbformat.read(ROOT / "examples" / "transfer_learning.ipynb", as_version=4)
    _keep_autos_choice("vgg16@pool5-gap")  # the kernel is another process: it would time both engines
    env = {"FLOWERFEAT_WEIGHTS": "none", "FLOWERFEAT_LAYER": "pool5-gap"}  # the data and out paths: the defaults
    old = dict(os.environ)
    for name in ("FLOWERFEAT_DATA", "FLOWERFEAT_OUT"):
        os.environ.pop(name, None)
    os.environ.update(env)  # the kernel inherits them
    try:
        where = {"metadata": {"path": project / "examples"}}
        NotebookClient(nb, timeout=300, kernel_name="python3", resources=where).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Test Accuracy (Overall)" in text and "Epoch 2 done" in text and " -> " in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the training images and the sample results, inline
    assert list((project / "data" / "features").glob("flower_photos-*/vgg16-pool5-gap-random/heads/notebook.pt"))


def _keep_autos_choice(model_cut: str) -> None:
    """The choice auto would make by measuring (fastest.py), kept in the test's own user cache as
    if measured: torch, as resolve_precision says. A kernel on another thread count measures, slower but the same."""
    import importlib.util

    from flowerfeat import fastest

    if importlib.util.find_spec("onnxruntime") is None:
        return
    precision = runtime.resolve_precision("auto", torch.device("cpu"))
    path = store.user_cache(fastest.KEPT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({f"{model_cut} on {fastest.cpu_kind()}": {"chosen": ["torch", precision]}}))


def test_every_public_name_has_a_docstring_with_an_example():
    for name in flowerfeat.__all__:
        if name != "__version__":
            assert "Example::" in (getattr(flowerfeat, name).__doc__ or ""), name


def test_config_errors_name_the_field_for_both_readers():
    with pytest.raises(flowerfeat.FlowerfeatError, match=r"batch_size \(--batch-size\) must be >= 0, got -1"):
        flowerfeat.ExtractConfig(batch_size=-1)
