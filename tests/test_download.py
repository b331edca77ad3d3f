"""The flowers download: deterministic split, safe unpacking, clear offline failure."""

from __future__ import annotations

import io
import tarfile

import pytest

from flowerfeat import download
from flowerfeat.errors import FlowerfeatError


def make_archive(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_split_is_deterministic_and_15_percent():
    from flowerfeat.layouts import held_out

    names = [f"{i}_photo_{i * 7919 % 10007}.jpg" for i in range(4000)]
    first = held_out(names, download.TEST_FRACTION)
    assert first == held_out(list(reversed(names)), download.TEST_FRACTION) and len(first) == 600
    assert len(held_out(names + ["new.jpg"], download.TEST_FRACTION) ^ first) <= 2  # one more file moves few


def test_download_lays_out_train_and_test(tmp_path):
    members = {f"flower_photos/{c}/{c}_{i}.jpg": b"x" for c in ("daisy", "roses") for i in range(40)}
    members["flower_photos/LICENSE.txt"] = b"licence"
    archive = make_archive(tmp_path / "f.tgz", members)
    counts = download.download_flowers(tmp_path / "out", url=archive.as_uri(), expected_bytes=None)
    assert counts["train"] + counts["test"] == 80 and counts["test"] > 0
    for split in ("train", "test"):
        assert sorted(p.name for p in (tmp_path / "out" / split).iterdir()) == ["daisy", "roses"]
    from flowerfeat.layouts import held_out

    test_names = {p.name for p in (tmp_path / "out" / "test").rglob("*.jpg")}
    names = [n.split("/")[-1] for n in members if n.endswith(".jpg")]
    assert test_names == held_out(names[:40], 0.15) | held_out(names[40:], 0.15) and len(test_names) == 12
    assert not list(tmp_path.glob(".download-*"))  # the work folder is gone


def test_size_mismatch_is_refused(tmp_path):
    archive = make_archive(tmp_path / "f.tgz", {"flower_photos/a/1.jpg": b"x"})
    with pytest.raises(FlowerfeatError, match="expected 123; the download was cut short"):
        download.download_flowers(tmp_path / "out", url=archive.as_uri(), expected_bytes=123)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("evil", ["../escape.jpg", "/abs/escape.jpg", "flower_photos/../../escape.jpg"])
def test_members_outside_the_target_are_refused(tmp_path, evil):
    archive = make_archive(tmp_path / "f.tgz", {"flower_photos/a/1.jpg": b"x", evil: b"evil"})
    with pytest.raises(FlowerfeatError, match="unsafe archive member"):
        download.download_flowers(tmp_path / "sub" / "out", url=archive.as_uri(), expected_bytes=None)
    assert not list(tmp_path.rglob("escape.jpg")) and not (tmp_path / "sub" / "out").exists()


def test_symlink_member_is_refused(tmp_path):
    with tarfile.open(tmp_path / "f.tgz", "w:gz") as tar:
        link = tarfile.TarInfo("flower_photos/a/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(FlowerfeatError, match="unsafe archive member"):
        download.download_flowers(tmp_path / "out", url=(tmp_path / "f.tgz").as_uri(), expected_bytes=None)


def test_offline_names_the_url_and_the_way_out(tmp_path):
    url = "http://127.0.0.1:9/flower_photos.tgz"  # nothing listens on the discard port: refused at once
    with pytest.raises(
        FlowerfeatError, match=r"could not download http://127\.0\.0\.1:9/flower_photos\.tgz.*--data DIR"
    ):
        download.download_flowers(tmp_path / "out", url=url)


def test_existing_target_is_not_touched(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FlowerfeatError, match="already exists"):
        download.download_flowers(tmp_path / "out", url="http://127.0.0.1:9/x.tgz")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
