"""The extraction loop: schema, no-op reruns, incremental updates, bad images, locking, views, float16."""

from __future__ import annotations

import shutil
import sys

import h5py
import numpy as np
import pytest

from flowerfeat import FORMAT_VERSION, store
from flowerfeat.errors import FlowerfeatError
from conftest import TINY, cached, TinyTrunk, extract, tiny_runs, write_corpus


def datasets(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in store.DATASETS}


def test_schema_shapes_dtypes_and_attributes(folder, tmp_path):
    res = extract(folder, tmp_path / "f")
    assert res["train"].status == "extracted" and res["train"].rows == 18 and res["test"].rows == 9
    with h5py.File(cached(tmp_path / "f", folder) / "train.h5", "r") as f:  # plain h5py reads everything
        assert f["features"].shape == (18, 24) and f["features"].dtype == np.float32
        assert f["labels"].dtype == np.int64 and f["labels"][...].tolist() == [0] * 6 + [1] * 6 + [2] * 6
        assert f["paths"][0].decode() == "train/daisy/train_daisy_0.jpg"
        assert f["skipped"].shape == (0, 2)
        assert list(f.attrs["classes"]) == ["daisy", "roses", "tulips"]
        assert f.attrs["format_version"] == FORMAT_VERSION and f.attrs["complete"]
        for key in (
            "layer",
            "weights",
            "preprocessing",
            "precision",
            "dtype",
            "fingerprint",
            "library_versions",
            "created",
        ):
            assert key in f.attrs, key
        assert '"crop_size": [224]' in f.attrs["preprocessing"]
        assert np.isfinite(f["features"][...]).all() and f["features"][...].std() > 0
    assert not (cached(tmp_path / "f", folder) / "train.h5.partial").exists()


def test_second_run_does_nothing(folder, tmp_path):
    extract(folder, tmp_path / "f")
    before = (cached(tmp_path / "f", folder) / "train.h5").stat().st_mtime_ns
    res = extract(folder, tmp_path / "f")
    assert res["train"].status == "up to date" and res["train"].computed == 0
    assert (cached(tmp_path / "f", folder) / "train.h5").stat().st_mtime_ns == before


def test_added_and_removed_images_extract_only_the_difference(folder, tmp_path):
    extract(folder, tmp_path / "f")
    shutil.copy(folder / "train/roses/train_roses_0.jpg", folder / "train/roses/zz_new.jpg")
    (folder / "train/daisy/train_daisy_1.png").unlink()
    res = extract(folder, tmp_path / "f")
    assert res["train"].status == "updated" and res["train"].computed == 1 and res["test"].status == "up to date"
    fresh = extract(folder, tmp_path / "fresh")
    assert fresh["train"].computed == 18
    a, b = datasets(cached(tmp_path / "f", folder) / "train.h5"), datasets(cached(tmp_path / "fresh", folder) / "train.h5")
    assert list(a["paths"]) == list(b["paths"])
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-6, atol=1e-6)


def test_changed_setting_reextracts_and_says_why(folder, tmp_path):
    extract(folder, tmp_path / "f")
    res = extract(folder, tmp_path / "f", dtype="float16")
    assert res["train"].computed == 18 and "dtype float32 -> float16" in res["train"].reason
    with h5py.File(cached(tmp_path / "f", folder) / "train.h5", "r") as f:
        assert f["features"].dtype == np.float16


def test_float16_storage_round_trip(folder, tmp_path):
    extract(folder, tmp_path / "a")
    extract(folder, tmp_path / "b", dtype="float16")
    a, b = (
        store.load_features(cached(tmp_path / "a", folder) / "train.h5"),
        store.load_features(cached(tmp_path / "b", folder) / "train.h5"),
    )
    assert b.X.dtype == np.float32  # loaded as float32
    np.testing.assert_allclose(b.X, a.X, rtol=1e-3, atol=1e-3)
    assert (cached(tmp_path / "b", folder) / "train.h5").stat().st_size < (cached(tmp_path / "a", folder) / "train.h5").stat().st_size


@pytest.mark.parametrize("readers", [0, 2])  # read between batches, or by two reader threads
def test_bad_images_are_skipped_recorded_and_the_run_goes_on(folder, tmp_path, readers):
    expected = write_corpus(folder / "train" / "daisy")
    res = extract(folder, tmp_path / "f", workers=readers, batch_size=3)
    bad = {name for name, outcome in expected.items() if outcome != "ok"}
    skipped = store.read_skipped(cached(tmp_path / "f", folder) / "train.h5")
    assert {p.split("/")[-1] for p, _ in skipped} == {
        n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in bad
    }
    assert res["train"].rows == 18 + len(expected) - len(bad)
    reasons = dict(skipped)
    assert "empty file" in reasons["train/daisy/zero.jpg"]
    assert "decompression bomb" in reasons["train/daisy/bomb.png"]
    assert "caf\\xe9.jpg" in "".join(reasons)  # the non-UTF-8 name is recorded, escaped


def test_augmented_views_are_cached_for_train_only(folder, tmp_path):
    extract(folder, tmp_path / "f", views=2)
    tr, te = (
        store.load_features(cached(tmp_path / "f", folder) / "train.h5"),
        store.load_features(cached(tmp_path / "f", folder) / "test.h5"),
    )
    assert len(tr.y) == 18 * 3 and tr.views.tolist()[:3] == [0, 1, 2] and tr.meta["views"] == 2
    assert len(te.y) == 9 and te.meta["views"] == 0
    assert not np.allclose(tr.X[0], tr.X[1])  # a view differs from the centre crop
    # seeded: the same views again, here read by three reader threads drawing them side by side
    again = extract(folder, tmp_path / "g", views=2, workers=3, batch_size=2)
    assert again["train"].rows == 54
    np.testing.assert_array_equal(tr.X, store.load_features(cached(tmp_path / "g", folder) / "train.h5").X)


def test_a_second_run_on_the_same_output_is_refused(folder, tmp_path):
    out = tmp_path / "f"
    cached(out, folder).mkdir(parents=True)
    with store.exclusive_lock(cached(out, folder), "features-rank0of1"):
        with pytest.raises(FlowerfeatError, match="another flowerfeat run is writing here"):
            extract(folder, out)
    assert not (cached(out, folder) / "train.h5").exists() and not (cached(out, folder) / "train.h5.partial").exists()


def test_unwritable_output_is_refused_before_work(folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FlowerfeatError, match="not writable"):
        extract(folder, blocker / "sub")


def test_adding_views_reuses_the_centre_crops(folder, tmp_path):
    extract(folder, tmp_path / "f")
    res = extract(folder, tmp_path / "f", views=1)
    assert res["train"].computed == 18 and res["train"].rows == 36 and res["test"].status == "up to date"
    res = extract(folder, tmp_path / "f", views=1, view_seed=5)
    assert res["train"].computed == 18 and "view_seed 0 -> 5" not in res["train"].reason


def test_a_crash_mid_run_keeps_finished_batches_and_resumes(folder, tmp_path):
    class Crashes(TinyTrunk):
        calls = 0

        def forward(self, x):
            Crashes.calls += 1
            if Crashes.calls == 3:
                raise RuntimeError("worker died")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="worker died"), tiny_runs(Crashes):
        extract(folder, tmp_path / "f")
    progress = (cached(tmp_path / "f", folder) / "train.h5.partial" / "rank0of1" / "progress.json").read_text()
    assert '"batches": 2' in progress and not (cached(tmp_path / "f", folder) / "train.h5").exists()
    res = extract(folder, tmp_path / "f")
    assert res["train"].status == "resumed" and res["train"].computed == 18 - 8
    extract(folder, tmp_path / "fresh")
    np.testing.assert_array_equal(
        datasets(cached(tmp_path / "f", folder) / "train.h5")["features"],
        datasets(cached(tmp_path / "fresh", folder) / "train.h5")["features"],
    )


def test_disk_full_is_one_line_and_resumable(folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flowerfeat import cli

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(cached(tmp_path / "f", folder) / "train.h5.partial"))

    monkeypatch.setattr(store.ShardLog, "append", full)
    r = CliRunner().invoke(
        cli.app,
        ["features", "--data", str(folder), "--out", str(tmp_path / "f"), "--model", "tiny", "--workers", "0"],
    )
    assert r.exit_code == 1 and "No space left on device; finished batches are saved" in r.output
    assert "Traceback" not in r.output


def test_compression_rewrites_from_cached_rows(folder, tmp_path):
    extract(folder, tmp_path / "f")
    plain = datasets(cached(tmp_path / "f", folder) / "train.h5")["features"]
    res = extract(folder, tmp_path / "f", compression="lzf")
    assert res["train"].computed == 0 and res["train"].status == "updated" and "compression" in res["train"].reason
    with h5py.File(cached(tmp_path / "f", folder) / "train.h5", "r") as f:
        assert f["features"].compression == "lzf"
        np.testing.assert_array_equal(f["features"][...], plain)


def test_a_file_with_an_older_fingerprint_is_rewritten_from_its_rows(folder, tmp_path):
    extract(folder, tmp_path / "f")
    before = datasets(cached(tmp_path / "f", folder) / "train.h5")["features"]
    with h5py.File(cached(tmp_path / "f", folder) / "train.h5", "r+") as f:
        f.attrs["fingerprint"] = "written-by-an-older-flowerfeat"
    res = extract(folder, tmp_path / "f")
    assert res["train"].computed == 0 and "older fingerprint" in res["train"].reason
    np.testing.assert_array_equal(datasets(cached(tmp_path / "f", folder) / "train.h5")["features"], before)


def test_broken_links_are_skipped_and_recorded_links_to_images_extracted(folder, tmp_path):
    d = folder / "train" / "daisy"
    (d / "broken_link.jpg").symlink_to(folder / "nowhere.jpg")
    (d / "good_link.jpg").symlink_to(d / "train_daisy_0.jpg")
    res = extract(folder, tmp_path / "f")
    assert res["train"].rows == 19 and res["train"].skipped == [("train/daisy/broken_link.jpg", "broken symbolic link")]
    fs = store.load_features(res["train"].path)
    np.testing.assert_array_equal(
        fs.X[fs.paths.index("train/daisy/good_link.jpg")], fs.X[fs.paths.index("train/daisy/train_daisy_0.jpg")]
    )


def test_each_layer_and_weights_keeps_its_own_cache(folder, tmp_path):
    a = extract(folder, tmp_path / "f", layer="mean")
    b = extract(folder, tmp_path / "f", layer="grid")
    assert a["train"].path.parent.name == "tiny-mean-random" and b["train"].path.parent.name == TINY
    assert a["train"].path.exists() and b["train"].path.exists()  # switching --layer orphans nothing
    latest = (tmp_path / "f" / store.LATEST).read_text().strip()
    assert tmp_path / "f" / latest == b["train"].path.parent  # <data set>/<trunk>, relative to the root
    assert store.find_features(tmp_path / "f", "train") == b["train"].path  # the latest extraction
    assert store.find_features(tmp_path / "f", "test", layer="mean") == a["test"].path
    assert store.find_features(a["train"].path.parent, "train") == a["train"].path
    with pytest.raises(FlowerfeatError, match="no features for --layer fc6 .*there are: flowers-\\w+/tiny-grid-random"):
        store.find_features(tmp_path / "f", "train", layer="fc6")
    again = extract(folder, tmp_path / "f", layer="mean")
    assert again["train"].status == "up to date" and store.find_features(tmp_path / "f", "train") == a["train"].path


def test_a_file_of_an_older_format_is_rebuilt_never_mixed(folder, tmp_path):
    import h5py

    first = extract(folder, tmp_path / "f")
    with h5py.File(first["train"].path, "r+") as f:
        f.attrs["format_version"] = 1  # as flowerfeat 0.1 wrote it, before the model was recorded
    with pytest.raises(FlowerfeatError, match="made by an earlier flowerfeat .*extract again"):
        store.read_meta(first["train"].path)
    res = extract(folder, tmp_path / "f")
    assert res["train"].computed == 18 and res["train"].reused == 0 and "unusable" in res["train"].reason
    assert store.read_meta(res["train"].path)["format_version"] == FORMAT_VERSION


def test_the_split_is_recorded_and_fingerprinted(tmp_path):
    from conftest import make_folder

    root = make_folder(tmp_path / "d", {"train": 5})
    a = extract(root, tmp_path / "f", test_fraction=0.4)
    meta = store.read_meta(a["test"].path)
    assert meta["layout"] == "folders" and meta["test_fraction"] == 0.4 and a["test"].rows == 6
    b = extract(root, tmp_path / "f", test_fraction=0.2)
    assert b["test"].rows == 3
    assert store.read_meta(b["test"].path)["fingerprint"] != meta["fingerprint"]


def test_counts_say_what_happened(folder, tmp_path):
    extract(folder, tmp_path / "f")
    (folder / "train/daisy/train_daisy_1.png").unlink()
    res = extract(folder, tmp_path / "f")["train"]
    assert (res.status, res.computed, res.reused, res.removed, res.rows) == ("updated", 0, 17, 1, 17)


def test_a_batch_of_unreadable_images_only(folder, tmp_path):
    d = folder / "train" / "daisy"
    for i in range(5):  # sorted first: the whole first batch of 4 is unreadable
        (d / f"a_broken_{i}.jpg").write_bytes(b"not an image")
    res = extract(folder, tmp_path / "f")["train"]
    assert res.rows == 18 and len(res.skipped) == 5


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own niceness is Linux's")
def test_reader_threads_yield_the_cores_to_the_engine_and_leave_the_caller_as_it_was():
    import os
    import threading

    from flowerfeat.extraction import reader

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    class Units:
        def __getitem__(self, unit):
            return None, unit, str(niceness())  # the reader's niceness as the skip reason

    caller = niceness()
    probe = []
    t = threading.Thread(target=lambda: probe.append(_may_lower_own_priority()))
    t.start()
    t.join()
    if not probe[0]:
        pytest.skip("this sandbox refuses a thread its own niceness")
    batches = list(reader.threaded(Units(), [[0, 1], [2]], threads=2))
    assert [[unit for unit, _ in skipped] for _, _, skipped in batches] == [[0, 1], [2]]
    readers = {int(why) for _, _, skipped in batches for _, why in skipped}
    assert readers == {min(19, caller + reader.READER_NICE)} and (min(readers) > caller or caller == 19)
    assert niceness() == caller


def _may_lower_own_priority() -> bool:
    import os
    import threading

    me = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + 1))
    except OSError:
        return False
    return True
