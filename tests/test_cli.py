"""The CLI through typer's CliRunner: the whole product path, exit codes and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flowerfeat.cli import app
from conftest import RANDOM, blobs, cached, make_folder, vgg_preprocessing, write_features

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_features_fit_report_end_to_end_with_vgg16(tmp_path):
    """Real VGG16 (weights=None) at fc7 on a tiny folder: the product path a user runs."""
    data = make_folder(tmp_path / "flowers", {"train": 4, "test": 2})
    feats, head = tmp_path / "features", tmp_path / "runs" / "head.pt"
    r = run("features", "--data", data, "--out", feats, "--weights", "none", "--batch-size", "6", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert re.search(r"train: 12 extracted -> .*/flowers-\w{8}/vgg16-fc7-random/train\.h5 \(12 rows\)", r.output)
    r = run("features", "--data", data, "--out", feats, "--weights", "none")
    assert r.exit_code == 0 and "train: up to date" in r.output and "test: up to date" in r.output
    feats = cached(feats, data, "vgg16-fc7-random")
    r = run("fit-head", "--features", feats / "train.h5", "--out", head, "--epochs", "2", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    assert "Epoch 2 done" in r.output and f"Saved head to {head}" in r.output
    r = run("report", "--features", feats / "test.h5", "--head", head, "--figures", tmp_path / "fig")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"head {head}: vgg16 fc7, 3 classes (daisy, roses, tulips), data set {data}, fitted ")
    assert r.output.splitlines()[1].startswith("Test Loss: ")
    assert re.search(r"Test Accuracy of daisy: +\d+% \( ?\d/ 2\)", r.output)
    assert re.search(r"Test Accuracy \(Overall\): +\d+% \( ?\d/ 6\)", r.output)
    assert "Confusion matrix" in r.output and (tmp_path / "fig" / "confusion_matrix.png").stat().st_size > 1000
    r = run("report", "--features", feats / "test.h5", "--head", head, "--json")
    assert r.exit_code == 0 and '"per_class"' in r.output


def _trained_head(tmp_path, **meta):
    x, y = blobs(20, dim=8)
    train_file = write_features(tmp_path / "train.h5", x, y, **meta)
    r = run("fit-head", "--features", train_file, "--out", tmp_path / "head.pt")
    assert r.exit_code == 0, r.output
    return tmp_path / "head.pt"


def _data(tmp_path):
    return make_folder(tmp_path / "d", {"train": 1, "test": 1})


# (name, setup(tmp_path) -> argv, message fragment); every case must exit 2 with one line and write nothing.
STRUCTURAL = [
    (
        "data folder missing",
        lambda t: ["features", "--data", t / "nope"],
        "data folder not found; run `flowerfeat download`",
    ),
    (
        "no test split",
        lambda t: ["features", "--data", _rm(_data(t) / "test"), "--split", "train", "--split", "test"],
        "no test split (found: train/); pass --split train",
    ),
    ("split without images", lambda t: ["features", "--data", _empty_split(_data(t))], "no class folders"),
    ("empty class folder", lambda t: ["features", "--data", _empty_class(_data(t))], "class folder has no images"),
    (
        "classes differ",
        lambda t: ["features", "--data", _rename_class(_data(t))],
        "class folder(s) rose are not in the training split (nothing to learn them from)",
    ),
    (
        "output not writable",
        lambda t: ["features", "--data", _data(t), "--out", _file(t) / "sub"],
        "output folder is not writable",
    ),
    ("unknown layer", lambda t: ["features", "--data", _data(t), "--layer", "fc8"], "vgg16 has no layer 'fc8'; choose one of: fc7, fc6, pool5, pool5-gap"),
    (
        "weights not a state dict",
        lambda t: ["features", "--data", _data(t), "--layer", "pool5", "--weights", _file(t)],
        "not a loadable state dict",
    ),
    (
        "weights with wrong shapes",
        lambda t: ["features", "--data", _data(t), "--layer", "pool5", "--weights", _bad_shapes(t)],
        "has shape (2,), vgg16 needs (64, 3, 3, 3)",
    ),
    ("epochs 0", lambda t: ["fit-head", "--epochs", "0"], "epochs (--epochs) must be > 0"),
    ("epochs negative", lambda t: ["fit-head", "--epochs", "-3"], "epochs (--epochs) must be > 0"),
    ("feature file not HDF5", lambda t: ["fit-head", "--features", _file(t)], "not a readable HDF5 feature file"),
    ("feature file truncated", lambda t: ["fit-head", "--features", _truncated(t)], "truncated or corrupt"),
    (
        "report: features from another layer",
        lambda t: ["report", "--head", _trained_head(t), "--features", _other(t, layer="fc6")],
        "layer fc7 vs fc6",
    ),
    (
        "report: features from other weights",
        lambda t: ["report", "--head", _trained_head(t), "--features", _other(t, weights="file:x.pth")],
        "weights none:random-init-seed-0 vs file:x.pth",
    ),
    (
        "report: checkpoint classes differ",
        lambda t: ["report", "--head", _trained_head(t), "--features", _other(t, classes=("p", "q", "r"))],
        "classes ['a', 'b', 'c'] vs ['p', 'q', 'r']",
    ),
    (
        "report: head missing",
        lambda t: ["report", "--head", t / "none.pt", "--features", _other(t)],
        "head checkpoint not found",
    ),
    (
        "report: a directory given as the head",
        lambda t: ["report", "--head", t, "--features", _other(t)],
        "no head here; run `flowerfeat fit-head` first",
    ),
]


def _rm(p: Path) -> Path:
    import shutil

    shutil.rmtree(p)
    return p.parent


def _empty_split(root: Path) -> Path:
    import shutil

    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    return root


def _empty_class(root: Path) -> Path:
    for p in (root / "train" / "roses").iterdir():
        p.unlink()
    return root


def _rename_class(root: Path) -> Path:
    (root / "test" / "roses").rename(root / "test" / "rose")
    return root


def _file(t: Path) -> Path:
    (t / "plain.txt").write_text("not a folder, not a model, not HDF5")
    return t / "plain.txt"


def _bad_shapes(t: Path) -> Path:
    from flowerfeat.backbones.vgg import CONV_IDX

    torch.save({f"features.{i}.{w}": torch.zeros(2) for i in CONV_IDX for w in ("weight", "bias")}, t / "bad.pth")
    return t / "bad.pth"


def _truncated(t: Path) -> Path:
    x, y = blobs(20, dim=8)
    p = write_features(t / "cut.h5", x, y)
    p.write_bytes(p.read_bytes()[:1500])
    return p


def _other(t: Path, classes=("a", "b", "c"), **meta) -> Path:
    x, y = blobs(5, dim=8)
    return write_features(t / "test.h5", x, y, classes=classes, **meta)


@pytest.mark.parametrize("name, argv, message", STRUCTURAL, ids=[s[0] for s in STRUCTURAL])
def test_structural_errors_exit_2_with_one_line(tmp_path, monkeypatch, name, argv, message):
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    r = run(*args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    # the error is one line, the last; before it at most the steps that succeeded ("scanning DIR: ... (0.0 s)")
    assert lines[-1].startswith("error: ") and message in lines[-1], r.output
    assert all(re.fullmatch(r"(scanning|loading weights) .*\(\d+\.\d s\)", line) for line in lines[:-1]), r.output
    assert "Traceback" not in r.output
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if not p.name.startswith(".features-rank")}
    assert {p: m for p, m in after.items() if p in before} == {p: m for p, m in before.items() if p in after}
    assert not [p for p in after if p not in before and p.suffix in (".h5", ".pt", ".partial")]


def test_non_numeric_epochs_is_a_usage_error():
    r = run("fit-head", "--epochs", "two")
    assert r.exit_code == 2 and "--epochs" in r.output and "Traceback" not in r.output


def test_strict_exits_1_when_an_image_was_skipped(tmp_path):
    data = make_folder(tmp_path / "flowers", {"train": 1, "test": 1})
    (data / "train" / "daisy" / "broken.jpg").write_bytes(b"")
    r = run(
        "features",
        "--data",
        data,
        "--out",
        tmp_path / "f",
        "--weights",
        "none",
        "--layer",
        "pool5-gap",
        "--split",
        "train",
        "--workers",
        "0",
        "--strict",
    )
    assert r.exit_code == 1 and "1 unreadable image(s) skipped" in r.output and "broken.jpg: empty file" in r.output
    assert (cached(tmp_path / "f", data, "vgg16-pool5-gap-random") / "train.h5").exists()  # finished work is kept


def test_every_command_has_help_with_an_example():
    for cmd in app.registered_commands:
        assert "Example:" in (cmd.callback.__doc__ or ""), cmd.name


def test_every_command_is_documented_in_the_readme():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__
        assert f"flowerfeat {name}" in readme, name


def test_an_os_error_outside_features_promises_no_resume(tmp_path):
    """fit-head's --out under a plain file: exit 1, the path named, no 'finished batches are saved' (features only)."""
    x, y = blobs(5, dim=8)
    feats = write_features(tmp_path / "train.h5", x, y)
    blocker = _file(tmp_path)
    r = run("fit-head", "--features", feats, "--out", blocker / "head.pt", "--epochs", "1")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"error: {blocker}" in r.output and r.output.strip().endswith("fix this and rerun")
    assert "finished batches" not in r.output


def _features(data, out, *extra):
    r = run("features", "--data", data, "--out", out, "--weights", "none", "--workers", "0", *extra)
    assert r.exit_code == 0, r.output
    return r.output


def test_result_lines_say_what_happened_in_plain_words(tmp_path):
    data = make_folder(tmp_path / "d", {"train": 2, "test": 1})
    (data / "train" / "daisy" / "empty.jpg").write_bytes(b"")
    out = _features(data, tmp_path / "f", "--layer", "pool5-gap")
    assert re.search(r"train: 6 extracted, 1 skipped -> \S+train\.h5 \(6 rows\) in", out), out
    assert "[" not in out and "no feature file yet" not in out and "\n\n" not in out
    (data / "train" / "roses" / "train_roses_0.jpg").unlink()
    out = _features(data, tmp_path / "f", "--layer", "pool5-gap")
    assert re.search(r"train: 0 extracted, 1 skipped, 5 reused, 1 removed ->", out), out
    assert "test: up to date, 3 rows in" in out


def test_progress_goes_to_a_log_as_plain_lines(tmp_path):
    # CliRunner's stderr is not a terminal: what `features ... > log 2>&1` gets
    data = make_folder(tmp_path / "d", {"train": 3, "test": 1})
    out = _features(data, tmp_path / "f", "--layer", "pool5-gap", "--batch-size", "3")
    lines = out.splitlines()
    assert lines[0].startswith(f"scanning {data}: 9 train + 3 test images, 3 classes (")
    assert any(s.startswith("loading vgg16 weights (random init): done (") for s in lines)
    progress = [s for s in lines if re.fullmatch(r"(train|test): \d+/\d+ images \(\d+ %\), [\d.]+ images/s, ETA .*", s)]
    assert progress[0].startswith("train: 3/9 images (33 %)")  # the first batch already has a rate and an ETA
    assert any(s.startswith("train: 9/9 images (100 %)") and " in " in s for s in lines)  # the split's end


def test_fit_head_report_predict_pick_the_latest_cache_or_the_layer_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # heads go to heads/ beside their features by default
    data = make_folder(tmp_path / "d", {"train": 3, "test": 1})
    _features(data, "data/features", "--layer", "pool5-gap")
    _features(data, "data/features", "--layer", "pool5")
    r = run("fit-head")  # the latest extraction: pool5
    saved = cached("data/features", data, "vgg16-pool5-random") / "heads"
    assert r.exit_code == 0 and f"Saved head to {saved}/adam-2ep-seed0-" in r.output and "(vgg16 pool5, 25088-d" in r.output
    r = run("fit-head", "--layer", "pool5-gap")
    saved = cached("data/features", data, "vgg16-pool5-gap-random") / "heads"
    assert r.exit_code == 0 and f"Saved head to {saved}/adam-2ep" in r.output and "(vgg16 pool5-gap, 512-d" in r.output
    for layer in ("pool5", "pool5-gap"):  # each cache and each head are still there
        r = run("report", "--layer", layer, "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["overall"]["total"] == 3, r.output
        assert r.stderr.startswith("head data/features/d-") and f"vgg16 {layer}, 3 classes" in r.stderr
    r = run("report")  # the head saved last: pool5-gap's, with the test file beside its training features
    assert r.exit_code == 0 and r.output.startswith("head data/features/") and "\nTest Loss: " in r.output, r.output
    r = run("predict", data / "test", "--layer", "pool5")
    assert r.exit_code == 0 and len([s for s in r.output.splitlines() if s.startswith(str(data))]) == 3, r.output
    assert run("report", "--layer", "fc7").output.startswith("error: data/features: no head fitted on features of --layer fc7")


def test_predict_finds_the_weights_file_the_head_remembers(tmp_path, monkeypatch):
    from flowerfeat.backbones.vgg import VGG16
    from flowerfeat.weights import sha256_file

    monkeypatch.chdir(tmp_path)
    vgg = VGG16().load_vgg16(RANDOM, "pool5")
    weights = tmp_path / "w" / "vgg16_conv.pth"
    weights.parent.mkdir()
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, weights)
    data = make_folder(tmp_path / "d", {"train": 2, "test": 1})
    r = run("features", "--data", data, "--weights", weights, "--layer", "pool5-gap", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert run("fit-head").exit_code == 0
    r = run("predict", data / "test")  # no --weights: found at the recorded path, sha256 checked
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 1 + 3, r.output  # the head, then the images
    weights.rename(tmp_path / "moved.pth")
    r = run("predict", data / "test")
    sha = sha256_file(tmp_path / "moved.pth")
    assert r.exit_code == 2 and f"weights vgg16_conv.pth (sha256 {sha}), no longer at {weights}" in r.output
    assert "pass --weights PATH" in r.output
    assert run("predict", data / "test", "--weights", tmp_path / "moved.pth").exit_code == 0


def test_help_keeps_the_extras_names():
    out = run("features", "--help").output
    assert "the [timm] extra" in out and "the [onnx] extra" in out  # brackets are text, not markup


def test_a_refused_run_leaves_nothing_behind(tmp_path):
    """The trunk is refused after the scan (a file without the cut's weights): no cache folder, no lock file."""
    from flowerfeat.backbones.vgg import VGG16

    torch.save({k: v for k, v in VGG16().load_vgg16(RANDOM, "pool5").state_dict().items()
                if k.startswith("features.")}, tmp_path / "conv.pth")  # fmt: skip
    r = run("features", "--data", _data(tmp_path), "--out", tmp_path / "f", "--weights", tmp_path / "conv.pth")
    assert r.exit_code == 2 and "pass --layer pool5-gap" in r.output, r.output
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").rglob("*")), list((tmp_path / "f").rglob("*"))


def test_predict_with_nothing_readable_exits_1(tmp_path):
    head = _trained_head(tmp_path, preprocessing=vgg_preprocessing())
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"not an image")
    r = run("predict", tmp_path / "imgs", "--head", head)
    assert r.exit_code == 1 and "none of the 1 image(s) could be read" in r.output, r.output


def test_report_json_records_the_settings_used(tmp_path):
    head = _trained_head(tmp_path)
    r = run("report", "--head", head, "--features", _other(tmp_path), "--json")
    settings = json.loads(r.stdout)["provenance"]["head_settings"]
    assert settings["lr"] > 0 and settings["dropout"] == 0.5  # chosen from the features, not the options' 0 / None


def test_a_class_list_is_never_cut_mid_word(tmp_path):
    names = tuple(f"a_rather_long_class_name_{i}" for i in range(6))
    head = _trained_head(tmp_path)
    r = run("report", "--head", head, "--features", _other(tmp_path, classes=names[:3]))
    assert r.exit_code == 2 and "'a_rather_long_class_name_0', 'a_rather_long_class_name_1', ... +1 more]" in r.output
