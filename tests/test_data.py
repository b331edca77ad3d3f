"""Scanning ImageFolders, structural errors, and the bad-image corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowerfeat.data import BadImage, load_image, scan_data
from flowerfeat.errors import FlowerfeatError
from conftest import exif_rotated_jpeg, png_bytes, make_folder, write_corpus


def test_scan_is_sorted_and_labels_follow_classes(folder):
    splits = scan_data(folder)
    train = splits["train"]
    assert train.classes == ("daisy", "roses", "tulips")
    assert [i.relpath for i in train.items] == sorted(i.relpath for i in train.items)
    assert [i.label for i in train.items] == [0] * 6 + [1] * 6 + [2] * 6
    assert all(i.size > 0 and i.mtime_ns > 0 for i in train.items)


def test_hidden_and_non_image_files_are_ignored(folder):
    d = folder / "train" / "daisy"
    for name in (".DS_Store", "Thumbs.db", "notes.txt", "._train_daisy_0.jpg"):
        (d / name).write_bytes(b"junk")
    split = scan_data(folder)["train"]
    assert len(split.items) == 18
    assert sorted(Path(p).name for p in split.ignored) == sorted(
        [".DS_Store", "Thumbs.db", "notes.txt", "._train_daisy_0.jpg"]
    )


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: r.rename(r.parent / "elsewhere"), "data folder not found"),
        (lambda r: shutil.rmtree(r) or r.write_text("x"), "is a file, not a data folder; run"),
        (lambda r: (r / "test").rename(r / "tst"), "no 'test' folder"),
        (lambda r: [p.unlink() for p in (r / "train" / "roses").iterdir()], "class folder has no images"),
        (lambda r: (r / "test" / "roses").rename(r / "test" / "rose"), "classes differ"),
    ],
)
def test_structural_errors_name_the_path(folder, breakage, message):
    breakage(folder)
    with pytest.raises(FlowerfeatError, match=message):
        scan_data(folder)


def test_bad_image_corpus(tmp_path):
    expected = write_corpus(tmp_path)
    for name, outcome in expected.items():
        if outcome == "ok":
            img = load_image(tmp_path / name)
            assert img.mode == "RGB" and img.size[0] >= 1, name
        else:
            with pytest.raises(BadImage, match=outcome):
                load_image(tmp_path / name)


def test_exif_orientation_is_applied(tmp_path):
    (tmp_path / "r.jpg").write_bytes(exif_rotated_jpeg())
    img = load_image(tmp_path / "r.jpg")
    assert img.size == (30, 60)  # portrait after rotation
    top, bottom = np.asarray(img)[5, 15], np.asarray(img)[55, 15]
    assert top[0] > 200 and bottom[2] > 200  # red half on top, blue below: rotated 90 degrees clockwise


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 48 * 36).reshape(36, 48).astype(np.uint16)
    (tmp_path / "g.png").write_bytes(png_bytes(Image.fromarray(a)))
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 100 < rgb[18, 24, 0] < 160


def test_make_folder_is_varied(tmp_path):
    root = make_folder(tmp_path, {"train": 2})
    sizes = {Image.open(p).size for p in root.rglob("*.*")}
    assert len(sizes) > 1 and all(w != h for w, h in sizes)
