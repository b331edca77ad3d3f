"""Scanning ImageFolders, structural errors, and the bad-image corpus."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowerfeat.data import BadImage, load_image, scan_data
from flowerfeat.errors import FlowerfeatError
from conftest import make_folder, make_image


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


# -- the bad-image corpus: (file name, bytes maker, expected: "ok" or a fragment of the skip reason) --------------


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP, over Pillow's limit); no need for real pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 30))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return _save(img, "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("P", (32, 24), i * 40) for i in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return _png_bytes(img, transparency=0)


BASE = make_image(0, 0, (48, 36))
CORPUS = [
    ("zero.jpg", lambda: b"", "empty file"),
    ("truncated.jpg", lambda: _save(BASE, "JPEG")[:300], "corrupt or truncated"),
    ("text.jpg", lambda: b"this is not an image\n" * 20, "not an image"),
    ("png_named.jpg", lambda: _png_bytes(BASE), "ok"),
    ("rgba.png", lambda: _png_bytes(BASE.convert("RGBA")), "ok"),
    ("palette_transparent.png", _palette_with_transparency, "ok"),
    ("gray.jpg", lambda: _save(BASE.convert("L"), "JPEG"), "ok"),
    ("cmyk.jpg", lambda: _save(BASE.convert("CMYK"), "JPEG"), "ok"),
    (
        "gray16.png",
        lambda: _png_bytes(Image.fromarray((np.arange(48 * 36).reshape(36, 48) * 37).astype(np.uint16))),
        "ok",
    ),
    ("animated.gif", _animated_gif, "ok"),
    ("image.webp", lambda: _save(BASE, "WEBP"), "ok"),
    ("image.bmp", lambda: _save(BASE, "BMP"), "ok"),
    ("image.tiff", lambda: _save(BASE, "TIFF"), "ok"),
    ("exif_rotated.jpg", _exif_rotated_jpeg, "ok"),
    ("one_pixel.png", lambda: _png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))), "ok"),
    ("bomb.png", _bomb_png, "decompression bomb"),
]


def write_corpus(d: Path) -> dict[str, str]:
    """Write every corpus file (plus a non-UTF-8 name) into ``d``; returns name -> expectation."""
    d.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, make, outcome in CORPUS:
        (d / name).write_bytes(make())
        expected[name] = outcome
    bad_name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 byte: not valid UTF-8
    (d / bad_name).write_bytes(_save(BASE, "JPEG"))
    expected[bad_name] = "not valid UTF-8"
    return expected


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
    (tmp_path / "r.jpg").write_bytes(_exif_rotated_jpeg())
    img = load_image(tmp_path / "r.jpg")
    assert img.size == (30, 60)  # portrait after rotation
    top, bottom = np.asarray(img)[5, 15], np.asarray(img)[55, 15]
    assert top[0] > 200 and bottom[2] > 200  # red half on top, blue below: rotated 90 degrees clockwise


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 48 * 36).reshape(36, 48).astype(np.uint16)
    (tmp_path / "g.png").write_bytes(_png_bytes(Image.fromarray(a)))
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 100 < rgb[18, 24, 0] < 160


def test_make_folder_is_varied(tmp_path):
    root = make_folder(tmp_path, {"train": 2})
    sizes = {Image.open(p).size for p in root.rglob("*.*")}
    assert len(sizes) > 1 and all(w != h for w, h in sizes)
