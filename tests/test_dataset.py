"""Scanning label folders, ignore rules, the stable split, and decoding real photos."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from service import dataset as ds
from service.images import ImageError, load_rgb
from tests.conftest import clothing_photos, copy_subset


def test_scan_ignores_hidden_partial_and_non_images(tmp_path):
    root = copy_subset(tmp_path / "d", count=3)
    hat = root / "hat"
    photo = next(hat.iterdir())
    for junk in (".DS_Store", "._" + photo.name, photo.name + ".part", "x.jpg.crdownload", "notes.txt", "~x.jpg~"):
        (hat / junk).write_bytes(b"junk")
    (hat / ".hidden").mkdir()
    shutil.copy2(photo, hat / ".hidden" / "secret.jpg")
    (root / ".git").mkdir()
    (root / ".git" / "a.jpg").write_bytes(b"x")
    photos = ds.scan_folder(root)
    assert len(photos) == 9
    assert {p.label for p in photos} == {"hat", "pants", "shoes"}
    assert all(p.path.suffix == ".jpg" and not p.path.name.startswith(".") for p in photos)


def test_nested_folders_belong_to_their_label(tmp_path):
    root = copy_subset(tmp_path / "d", count=2)
    nested = root / "hat" / "summer" / "2026"
    nested.mkdir(parents=True)
    shutil.copy2(clothing_photos("train", "hat")[10], nested / "beach.jpg")
    photos = {p.relpath: p.label for p in ds.scan_folder(root)}
    assert photos["hat/summer/2026/beach.jpg"] == "hat"


def test_split_is_stable_as_photos_are_added(tmp_path):
    root = copy_subset(tmp_path / "d", count=15)
    _, val_before = ds.split(ds.scan_folder(root), 0.2)
    copy_subset(root, start=15, count=10)
    train_after, val_after = ds.split(ds.scan_folder(root), 0.2)
    before = {p.relpath for p in val_before}
    assert before and before <= {p.relpath for p in val_after}
    assert not before & {p.relpath for p in train_after}


def test_split_ignores_the_label_so_a_relabeled_photo_keeps_its_side(tmp_path):
    root = copy_subset(tmp_path / "d", count=15)
    photos = ds.scan_folder(root)
    for p in photos:
        moved = ds.Photo(p.path, "other", "other/" + p.relpath.split("/", 1)[1], p.size, p.mtime_ns)
        assert ds.holdout(p, 0.3) == ds.holdout(moved, 0.3)


def test_every_label_keeps_a_training_photo(tmp_path):
    root = copy_subset(tmp_path / "d", count=1)
    train, val = ds.split(ds.scan_folder(root), 0.99)
    assert {p.label for p in train} == {"hat", "pants", "shoes"}
    assert not val


def test_fewer_than_two_labels_is_an_error(tmp_path):
    with pytest.raises(ds.DatasetError, match="at least two label folders"):
        ds.check_labels(("hat",), tmp_path)
    with pytest.raises(ds.DatasetError, match="does not exist"):
        ds.scan_folder(tmp_path / "missing")


def test_decode_real_photo():
    pixels = load_rgb(clothing_photos("train", "shoes")[0])
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 10  # a real photo, not a blank


def test_exif_orientation_is_applied(tmp_path):
    # A real photo made landscape, stored with EXIF "rotate 90 CW" (orientation 6):
    # a viewer shows it upright; decoding must match the viewer.
    src = Image.open(clothing_photos("train", "pants")[0]).convert("RGB").resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = src.transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.jpg", quality=95)
    a = load_rgb(tmp_path / "rotated.jpg").astype(float)
    b = load_rgb(tmp_path / "upright.jpg").astype(float)
    c = load_rgb(tmp_path / "rotated.jpg", size=224)
    assert np.abs(a - b).mean() < 3
    # and the un-rotated decode would differ a lot
    raw = np.asarray(src.resize((224, 224), Image.BILINEAR)).astype(float)
    assert np.abs(raw - c).mean() > 10


def test_unreadable_files_raise_image_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(clothing_photos("train", "hat")[0].read_bytes()[:300])
    for path in (text, empty, truncated, tmp_path / "gone.jpg"):
        with pytest.raises(ImageError, match=path.name):
            load_rgb(path)


def test_png_with_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").min() == 255
