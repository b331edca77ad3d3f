"""Scanning ImageFolders, structural errors, and the bad-image corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowerfeat.data import BadImage, load_image
from flowerfeat.layouts import scan_data
from flowerfeat.errors import FlowerfeatError
from conftest import exif_rotated_jpeg, make_folder, make_image, png_bytes, write_corpus


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
        (lambda r: shutil.rmtree(r) or r.write_text("x"), "is a file, not a data folder or a .csv; run"),
        (lambda r: (r / "test").rename(r / "tst"), r"no test split \(found: train/\); pass --split train"),
        (lambda r: [p.unlink() for p in (r / "train" / "roses").iterdir()], "class folder has no images"),
        (lambda r: (r / "test" / "roses").rename(r / "test" / "rose"), "class folder.s. rose are not in the training"),
    ],
)
def test_structural_errors_name_the_path(folder, breakage, message):
    breakage(folder)
    with pytest.raises(FlowerfeatError, match=message):
        scan_data(folder, ("train", "test"))


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


# -- layouts: flat class folders, train/ alone, CSV; dangling links ----------------------------------------------


def _flat(root: Path, per_class=(10, 7, 4)) -> Path:
    """root/<class>/ images, no train/ or test/."""
    for c, (cls, n) in enumerate(zip(("daisy", "roses", "tulips"), per_class)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            make_image(c, i, (40, 30)).save(root / cls / f"{cls}_{i}.jpg")
    return root


def test_a_flat_folder_is_split_stratified_and_by_file_name(tmp_path):
    root = _flat(tmp_path / "flat")
    splits = scan_data(root, ("train", "test"), test_fraction=0.3)
    tr, te = splits["train"], splits["test"]
    assert tr.layout == te.layout == "flat" and te.test_fraction == 0.3 and tr.classes == te.classes
    assert [sum(i.label == c for i in te.items) for c in range(3)] == [3, 2, 1]  # round(0.3 x 10, 7, 4)
    assert {i.relpath for i in tr.items}.isdisjoint(i.relpath for i in te.items) and len(tr.items) + len(te.items) == 21
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    (moved / "daisy" / "daisy_99.jpg").write_bytes((moved / "daisy" / "daisy_0.jpg").read_bytes())
    again = scan_data(moved, ("test",), test_fraction=0.3)["test"]
    changed = {i.relpath for i in te.items} ^ {i.relpath for i in again.items}
    assert len(changed) <= 2  # another folder, one more image: the split moves by at most that image


def test_flat_and_train_only_folders_say_how_to_split_them(tmp_path):
    root = _flat(tmp_path / "flat")
    with pytest.raises(FlowerfeatError, match="class folders at the top, no train/, val/ .*; pass --test-fraction 0.2 .* or --split train"):
        scan_data(root)
    assert len(scan_data(root, ("train",))["train"].items) == 21  # all for training
    tonly = make_folder(tmp_path / "tonly", {"train": 4})
    assert list(scan_data(tonly)) == ["train"]  # every split it has
    with pytest.raises(FlowerfeatError, match=r"no test split \(found: train/\); pass --split train .* or --test-fraction 0.2"):
        scan_data(tonly, ("train", "test"))
    carved = scan_data(tonly, test_fraction=0.25)
    assert [len(carved[s].items) for s in ("train", "test")] == [9, 3] and carved["test"].layout == "folders"
    with pytest.raises(FlowerfeatError, match="has its own test/ folder; drop --test-fraction"):
        scan_data(make_folder(tmp_path / "both"), test_fraction=0.2)


def test_a_csv_of_paths_and_labels(tmp_path):
    root = _flat(tmp_path / "imgs", (3, 3, 0))
    rows = [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.jpg"))]
    (tmp_path / "labels.csv").write_text("filename,category\n" + "\n".join(rows + ["imgs/gone.jpg,roses"]) + "\n")
    pool = scan_data(tmp_path / "labels.csv", ("train",))["train"]
    assert pool.layout == "csv" and pool.classes == ("daisy", "roses") and len(pool.items) == 7
    assert (pool.root / pool.items[0].relpath).is_file()  # paths are relative to the CSV
    gone = [i for i in pool.items if i.relpath == "imgs/gone.jpg"][0]
    assert gone.size == -1  # kept, then skipped when decoded
    with pytest.raises(BadImage, match="file not found"):
        load_image(pool.root / gone.relpath)
    with_split = [r + ("," + ("test" if k % 3 == 0 else "train")) for k, r in enumerate(rows)]
    (tmp_path / "split.csv").write_text("\n".join(with_split) + "\n")  # no header this time
    by_column = scan_data(tmp_path / "split.csv")
    assert [len(by_column[s].items) for s in ("train", "test")] == [4, 2]
    (tmp_path / "gone_first.csv").write_text("\n".join(["imgs/gone.jpg,roses", *rows]) + "\n")  # no header
    first_gone = scan_data(tmp_path / "gone_first.csv", ("train",))["train"]
    assert len(first_gone.items) == 7 and "imgs/gone.jpg" in [i.relpath for i in first_gone.items]
    (tmp_path / "bad.csv").write_text("path,label\nimgs/daisy/daisy_0.jpg\n")
    with pytest.raises(FlowerfeatError, match="bad.csv: row 2: each row needs path,label"):
        scan_data(tmp_path / "bad.csv", ("train",))


def test_a_dangling_symbolic_link_is_an_unreadable_image(folder):
    d = folder / "train" / "daisy"
    (d / "broken_link.jpg").symlink_to(folder / "nowhere.jpg")
    (d / "good_link.jpg").symlink_to(d / "train_daisy_0.jpg")
    split = scan_data(folder)["train"]  # no error: the scan keeps it
    names = {Path(i.relpath).name: i for i in split.items}
    assert names["broken_link.jpg"].size == -1 and names["good_link.jpg"].size > 0
    with pytest.raises(BadImage, match="broken symbolic link"):
        load_image(d / "broken_link.jpg")
    assert load_image(d / "good_link.jpg").size == load_image(d / "train_daisy_0.jpg").size


def test_draft_decoding_keeps_the_size_the_resize_needs_and_is_recorded(tmp_path):
    import flowerfeat
    from flowerfeat import store
    from conftest import extract

    big = tmp_path / "big.jpg"
    make_image(0, 0, (1600, 1200)).save(big, quality=90)
    assert load_image(big).size == (1600, 1200)
    assert load_image(big, (256, 256)).size == (400, 300)  # 1/4: the smallest scale that keeps both sides >= 256
    assert load_image(big, (512, 512)).size == (800, 600)  # an augmented view keeps more (UnitDataset._draft)
    png = tmp_path / "big.png"
    make_image(0, 0, (1600, 1200)).save(png)
    assert load_image(png, (256, 256)).size == (1600, 1200)  # only JPEGs have DCT scales

    data = make_folder(tmp_path / "flowers", {"train": 3, "test": 1})  # small photos: a draft changes nothing
    full = extract(data, tmp_path / "f", splits=("train",))["train"].path
    draft = extract(data, tmp_path / "g", splits=("train",), decode="draft")["train"].path
    a, b = store.load_features(full), store.load_features(draft)
    assert (a.meta["decoder"], b.meta["decoder"]) == ("pil", "pil-draft") and np.array_equal(a.X, b.X)
    head = flowerfeat.fit_head(draft, epochs=1).save(tmp_path / "h.pt")
    assert flowerfeat.Classifier.load(head).mode == "draft"  # predict decodes as the features were decoded
