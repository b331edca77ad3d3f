"""Many data sets and many experiments side by side: nothing replaced silently, every answer names its source."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from flowerfeat import store
from flowerfeat.cli import app
from conftest import TINY, cached, make_folder

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def features(data, out, *extra):
    return run("features", "--data", data, "--out", out, "--model", "tiny", "--weights", "none", "--workers", "0",
               *extra).output  # fmt: skip


def test_two_data_sets_keep_their_caches_and_heads(tmp_path):
    a = make_folder(tmp_path / "photos", {"train": 3, "test": 1})
    b = make_folder(tmp_path / "other" / "photos", {"all": 4}, classes=("daisy", "roses"))  # the same folder name
    out = tmp_path / "f"
    features(a, out)
    features(b / "all", out, "--test-fraction", "0.25")
    assert cached(out, a).is_dir() and cached(out, b / "all").is_dir() and cached(out, a) != cached(out, b / "all")
    assert "train: up to date" in features(a, out)  # the first data set's rows are still there, untouched
    run("fit-head", "--features", cached(out, a))
    run("fit-head", "--features", cached(out, b / "all"))
    listed = run("runs", "--out", out).output
    assert f"data set {a.resolve()}" in listed and f"data set {(b / 'all').resolve()}" in listed
    assert listed.count("heads/adam-2ep-seed0-") == 2 and "test " in listed
    inventory = json.loads(run("runs", "--out", out, "--json").output)
    assert sorted(c["rows"]["train"] for c in inventory["caches"]) == [6, 9]


def test_another_fit_is_kept_beside_the_first_and_answers_name_it(tmp_path):
    data = make_folder(tmp_path / "photos", {"train": 3, "test": 1})
    out = tmp_path / "f"
    features(data, out)
    first = run("fit-head", "--features", out).output
    second = run("fit-head", "--features", out, "--epochs", "3").output
    heads = sorted((cached(out, data) / "heads").iterdir())
    assert len(heads) == 2 and {h.name.split("-seed")[0] for h in heads} == {"adam-2ep", "adam-3ep"}
    again = run("fit-head", "--features", out).output  # the same fit on the same features: the same name
    assert len(list((cached(out, data) / "heads").iterdir())) == 2 and first.splitlines()[-1].split(" (")[0] in again
    answer = run("predict", data / "test", "--head", out).output  # the head saved last answers, and says so
    assert answer.startswith(f"head {out}") and "tiny grid, 3 classes (daisy, roses, tulips)" in answer
    assert "adam-2ep" in answer.splitlines()[0]  # refitted last
    assert "adam-3ep" in second


def test_a_named_head_is_never_replaced_unasked(tmp_path):
    data = make_folder(tmp_path / "photos", {"train": 3, "test": 1})
    out = tmp_path / "f"
    features(data, out)
    run("fit-head", "--features", out, "--name", "mine")
    r = runner.invoke(app, ["fit-head", "--features", str(out), "--name", "mine", "--epochs", "3"])
    assert r.exit_code == 2 and "mine.pt: a head is already there; pass --replace" in r.output, r.output
    run("fit-head", "--features", out, "--name", "mine", "--epochs", "3", "--replace")


def test_a_moved_data_set_is_found_again_not_extracted_again(tmp_path):
    data = make_folder(tmp_path / "photos", {"train": 3, "test": 1})
    out = tmp_path / "f"
    features(data, out)
    old = cached(out, data)
    before = {p: p.stat().st_mtime_ns for p in old.glob("*.h5")}
    moved = data.rename(tmp_path / "renamed")
    printed = features(moved, out)
    assert "train: 0 extracted, 9 reused" in printed and f"rows found again in {old}" in printed, printed
    assert {p: p.stat().st_mtime_ns for p in old.glob("*.h5")} == before  # the other cache is left as it was


def test_a_cache_of_the_old_layout_is_listed_and_its_rows_reused(tmp_path):
    data = make_folder(tmp_path / "photos", {"train": 3, "test": 1})
    out = tmp_path / "f"
    features(data, out)
    shutil.move(cached(out, data), out / TINY)  # <out>/<trunk>/ as flowerfeat 0.2 laid it out
    shutil.rmtree(out / store.dataset_tag(data))
    assert "flowerfeat 0.2's layout" in run("runs", "--out", out).output
    printed = features(data, out)
    assert "train: 0 extracted, 9 reused" in printed and "test: 0 extracted, 3 reused" in printed, printed
