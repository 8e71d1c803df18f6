"""Decode photos into the model's input: RGB, 224x224, uint8, EXIF orientation applied.

Resizing is bilinear to the full frame (no crop), the same as Core ML's
``scaleFill`` crop-and-scale option, so training, ``predict`` and the app agree.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

try:  # HEIC/HEIF from iPhones
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - optional at runtime
    pillow_heif = None

SIZE = 224
# A photo bigger than this many pixels is refused rather than decoded (Pillow's
# default bomb limit is 89 MP; a 200 MP phone panorama is still legitimate).
Image.MAX_IMAGE_PIXELS = 256_000_000


class ImageError(ValueError):
    """The file could not be read as a photo. The message names the file."""


def open_rgb(path: Path, min_size: int = SIZE) -> Image.Image:
    """Decode ``path`` to an upright RGB image at least ``min_size`` on each side
    (JPEGs are decoded at a reduced scale when they are much larger), or raise
    :class:`ImageError`."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: cannot be read as an image (empty file, 0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                # JPEG: let the decoder downscale by 1/2..1/8 while decoding (much faster).
                img.draft("RGB", (min_size, min_size))
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: cannot be read as an image ({_describe(exc)})") from exc


def to_pixels(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """Whole frame squeezed to ``size`` x ``size`` (bilinear), as uint8 HWC."""
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_rgb(path: Path, size: int = SIZE) -> np.ndarray:
    """Decode ``path`` to a ``[size, size, 3]`` uint8 array, or raise :class:`ImageError`."""
    return to_pixels(open_rgb(path, size), size)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (what a user sees in Finder)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clipping.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file (missing, or deleted while it was read)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = str(exc).split(" - ")[0] or type(exc).__name__
    return text
