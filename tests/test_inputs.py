"""Real files of every kind people drop into photo folders, through a real training run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
import structlog
from PIL import Image

from service import pipeline
from service.images import ImageError, load_rgb
from tests.conftest import ROOT, clothing_photos, events_named

log = structlog.get_logger()


def _photo(label: str, i: int) -> Image.Image:
    return Image.open(clothing_photos("train", label)[40 + i]).convert("RGB")


def make_good_inputs(root: Path) -> dict[str, Path]:
    """Unusual but valid photos (from real clothing photos), each of which must be trained on."""
    hat, shoes = root / "hat", root / "shoes"
    files: dict[str, Path] = {}

    def add(name: str, path: Path, save) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path)
        files[name] = path

    src = _photo("hat", 0)
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(src.size))
    add("png_alpha", hat / "alpha.png", rgba.save)
    add("cmyk_jpeg", hat / "cmyk.jpg", lambda p: _photo("hat", 1).convert("CMYK").save(p, "JPEG"))
    gray16 = (np.asarray(_photo("hat", 2).convert("L"), dtype=np.uint16) * 257)
    add("png_16bit", hat / "gray16.png", lambda p: Image.fromarray(gray16).save(p))
    add("png_gray", hat / "gray.png", lambda p: _photo("hat", 3).convert("L").save(p))
    add("gif_palette", hat / "palette.gif", lambda p: _photo("hat", 4).convert("P", palette=Image.ADAPTIVE).save(p))
    frames = [_photo("shoes", 0), _photo("shoes", 1).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    add("gif_animated", shoes / "anim.gif", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    add("webp_animated", shoes / "anim.webp", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    add("heic", shoes / "iphone.heic", lambda p: pillow_heif.from_pillow(_photo("shoes", 2)).save(p, quality=80))
    add("heif", shoes / "iphone.heif", lambda p: pillow_heif.from_pillow(_photo("shoes", 3)).save(p, quality=80))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif_rotated", shoes / "rotated.jpg",
        lambda p: _photo("shoes", 4).transpose(Image.Transpose.ROTATE_90).save(p, exif=exif))
    add("very_large", shoes / "large.jpg", lambda p: _photo("shoes", 5).resize((6000, 8000)).save(p, quality=85))
    add("unicode_name", hat / "été 帽子 🎩.jpg", lambda p: _photo("hat", 5).save(p))
    add("nested_folder", hat / "summer" / "2026" / "beach.jpg", lambda p: _photo("hat", 6).save(p))
    add("unicode_label", root / "chapeaux d'été 👒" / "a.jpg", lambda p: _photo("hat", 7).save(p))
    return files


def make_bad_inputs(root: Path) -> dict[str, Path]:
    """Files that must be skipped with a warning naming them."""
    shoes = root / "shoes"
    files = {"empty": shoes / "empty.jpg", "text_as_jpg": shoes / "notes.jpg", "truncated": shoes / "cut.jpg",
             "bomb": shoes / "bomb.png", "symlink_loop": shoes / "loop-a.jpg"}
    files["empty"].write_bytes(b"")
    files["text_as_jpg"].write_text("not a photo")
    files["truncated"].write_bytes(clothing_photos("train", "shoes")[50].read_bytes()[:2000])
    Image.new("1", (20000, 16000)).save(files["bomb"])  # 320 MP: over the decompression-bomb limit
    os.symlink(shoes / "loop-b.jpg", files["symlink_loop"])
    os.symlink(files["symlink_loop"], shoes / "loop-b.jpg")
    return files


def test_every_input_kind(subset, job_for, captured):
    good = make_good_inputs(subset["train"])
    bad = make_bad_inputs(subset["train"])
    (subset["train"] / "empty-label").mkdir()
    (subset["train"] / "empty-label" / "broken.jpg").write_text("no")
    result = pipeline.run(job_for(subset), log=log)
    assert result.status == "published"
    labels = result.manifest["labels"]
    assert labels == sorted(["hat", "pants", "shoes", "chapeaux d'été 👒"])
    warned = {Path(e["file"]) for e in events_named(captured, "photo_skipped")}
    skipped = set(bad.values()) | {subset["train"] / "loop-b.jpg"} - {None}
    assert set(bad.values()) <= warned
    assert all(str(p) in result.skipped for p in bad.values())
    assert warned <= skipped | {subset["train"] / "shoes" / "loop-b.jpg", subset["train"] / "empty-label" / "broken.jpg"}
    # every odd-but-valid photo was used: 45 originals + 14 good ones
    assert result.manifest["n_train"] == 45 + len(good)
    assert events_named(captured, "labels_without_usable_photos")[0]["labels"] == ["empty-label"]
    for kind in ("empty", "truncated", "text_as_jpg", "bomb"):
        assert bad[kind].name in result.skipped[str(bad[kind])]


def test_decoded_pixels_of_odd_inputs(tmp_path):
    good = make_good_inputs(tmp_path)
    for kind, path in good.items():
        pixels = load_rgb(path)
        assert pixels.shape == (224, 224, 3) and pixels.std() > 5, kind
    # EXIF orientation: stored sideways, decoded upright like the original
    upright = np.asarray(_photo("shoes", 4).resize((224, 224), Image.BILINEAR), dtype=float)
    assert np.abs(load_rgb(good["exif_rotated"]).astype(float) - upright).mean() < 8
    # alpha composited on white: the transparent corner is white
    assert load_rgb(good["png_alpha"])[0, 0].min() > 240
    # animated: the first frame
    first = np.asarray(_photo("shoes", 0).resize((224, 224), Image.BILINEAR), dtype=float)
    assert np.abs(load_rgb(good["gif_animated"]).astype(float) - first).mean() < 20


def test_file_that_disappears_between_scan_and_read(subset, job_for, captured, monkeypatch):
    import service.embeddings as emb

    doomed = sorted((subset["train"] / "pants").iterdir())[0]
    real = emb.EmbeddingCache.content_hash

    def vanish_then_hash(self, photo):
        if photo.path == doomed and doomed.exists():
            doomed.unlink()  # deleted by the user right after the scan listed it
        return real(self, photo)

    monkeypatch.setattr(emb.EmbeddingCache, "content_hash", vanish_then_hash)
    result = pipeline.run(job_for(subset), log=log)
    assert result.status == "published" and result.manifest["n_train"] == 44
    assert str(doomed) in result.skipped


def _without_file_permission_override() -> list[str]:
    """Command prefix under which even root gets EACCES on a mode-000 file."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_file_without_read_permission(tmp_path):
    secret = tmp_path / "secret.jpg"
    shutil.copy2(clothing_photos("train", "hat")[0], secret)
    os.chmod(secret, 0o000)
    code = ("import sys; from service.images import load_rgb, ImageError\n"
            "try:\n    load_rgb(sys.argv[1])\nexcept ImageError as e:\n    print(e)\n")
    done = subprocess.run([*_without_file_permission_override(), sys.executable, "-c", code, str(secret)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "secret.jpg" in done.stdout and "permission denied" in done.stdout, done.stderr[-2000:]


def test_bomb_error_is_clear(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)
    with pytest.raises(ImageError, match="bomb.png"):
        load_rgb(bomb)
