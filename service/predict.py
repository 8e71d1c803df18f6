"""Classify photos with a published model's weights in MLX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import service  # noqa: F401
import mlx.core as mx

from service import weights
from service.images import load_rgb
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
    if manifest is None:
        raise FileNotFoundError(f"no published model {publisher.manifest_path}")
    net, _ = weights.load(publisher.mlx_weights(manifest["version"]))
    return Loaded(net, list(manifest["labels"]), int(manifest["version"]))


def probabilities(loaded: Loaded, paths: list[Path]) -> np.ndarray:
    """``[len(paths), n_labels]`` class probabilities."""
    x = mx.array(np.stack([load_rgb(p) for p in paths]).astype(np.float32))
    return np.array(mx.softmax(loaded.model(x), axis=-1))


def top_k(loaded: Loaded, probs: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(loaded.labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]
