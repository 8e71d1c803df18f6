"""Deterministic augmented views of a photo for deep fine-tuning.

View 0 is the photo as the model sees it in production (whole frame, 224x224).
Views 1..n-1 add a random resized crop, a horizontal flip and a small colour
jitter, drawn from a generator seeded by the photo's content hash and the view
number: the same photo always yields the same views, so the frozen part of the
network runs on each view once and its output can be cached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from service.images import SIZE, to_pixels


@dataclass(frozen=True)
class AugmentSettings:
    enabled: bool = True
    views: int = 3  # including the plain view 0
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction kept by the random crop
    flip: bool = True
    jitter: float = 0.2  # brightness/contrast/saturation factor range 1 +- jitter

    @property
    def n_views(self) -> int:
        return max(1, self.views) if self.enabled else 1


def _rng(content_sha: str, view: int) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{content_sha}:{view}".encode()).digest()[:8], "big")
    return np.random.default_rng(seed)


def _random_resized_crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float]) -> Image.Image:
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return img.crop((left, top, left + cw, top + ch))
    return img


def view(img: Image.Image, content_sha: str, index: int, settings: AugmentSettings) -> np.ndarray:
    """``[224, 224, 3]`` uint8 pixels of view ``index`` of ``img``."""
    if index == 0 or not settings.enabled:
        return to_pixels(img, SIZE)
    rng = _rng(content_sha, index)
    img = _random_resized_crop(img, rng, settings.crop_scale)
    if settings.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1 - settings.jitter, 1 + settings.jitter)))
    return to_pixels(img, SIZE)
