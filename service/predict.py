"""Classify photos with a published model's weights in MLX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import service  # noqa: F401
import mlx.core as mx

from service import weights
from service.images import ImageError, load_rgb
from service.mobilenet import MobileNetV2
from service.publish import Publisher


@dataclass(frozen=True)
class Loaded:
    model: MobileNetV2
    labels: list[str]
    version: int


def locate(model: str, output: Path | None = None) -> Publisher:
    """``model`` is ``path/Name.mlpackage``, ``path/Name.json`` or a name inside ``output``."""
    path = Path(model)
    if path.suffix in (".mlpackage", ".json"):
        return Publisher(path.parent if str(path.parent) else Path("."), path.stem)
    return Publisher(output or Path("."), model)


def load_published(publisher: Publisher) -> Loaded:
    manifest = publisher.current()
    if manifest is None and publisher.manifest_path.is_file():
        raise FileNotFoundError(f"{publisher.manifest_path}: not a readable watchtrain manifest (invalid JSON)")
    if manifest is None:
        raise FileNotFoundError(
            f"no model named {publisher.name!r} is published in {publisher.output} (no {publisher.manifest_path.name}); "
            "pass OUTPUT_DIR/NAME.mlpackage, or NAME with --output OUTPUT_DIR")
    net, _ = weights.load(publisher.mlx_weights(manifest["version"]))
    return Loaded(net, list(manifest["labels"]), int(manifest["version"]))


def probabilities(loaded: Loaded, paths: list[Path]) -> np.ndarray:
    """``[len(paths), n_labels]`` class probabilities."""
    return probabilities_of_pixels(loaded.model, [load_rgb(p) for p in paths])


def probabilities_of_photos(loaded: Loaded, photos: list, batch: int = 16) -> tuple[np.ndarray, list]:
    """Probabilities for dataset photos, leaving out unreadable ones; returns (probs, kept photos)."""
    kept, pixels = [], []
    for photo in photos:
        try:
            pixels.append(load_rgb(photo.path))
            kept.append(photo)
        except ImageError:
            continue
    return probabilities_of_pixels(loaded.model, pixels, batch), kept


def top_k(loaded: Loaded, probs: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(loaded.labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def probabilities_of_pixels(model: MobileNetV2, pixels: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """Softmax outputs for ``[224, 224, 3]`` uint8 arrays, in bounded-memory batches."""
    out = [np.array(mx.softmax(model(mx.array(np.stack(pixels[i : i + batch]).astype(np.float32))), axis=-1))
           for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.spec.num_classes), np.float32)
