"""Find, download and load MobileNetV2 weights into the MLX model.

Accepted key layouts: torchvision (``features.N...``), timm (``conv_stem``,
``blocks.S.B...``) and watchtrain's own (saved by :func:`save_model`, batch norm
already folded). The safetensors metadata says how to run the weights:
``padding`` (tf_same | symmetric), ``normalization`` (inception | imagenet) and
``num_classes``; weights without metadata (timm, torchvision releases) use
symmetric padding and ImageNet mean/std.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import service  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from service.mobilenet import INVERTED_RESIDUAL_SETTING, ModelSpec, MobileNetV2

DEFAULT_WEIGHTS_URL = (
    "https://huggingface.co/timm/mobilenetv2_100.ra_in1k/resolve/main/model.safetensors"
)
CACHE_FILENAME = "mobilenet_v2.safetensors"
BN_EPS = 1e-5


class WeightsError(RuntimeError):
    """Weights are missing, unreadable, or not MobileNetV2."""


@dataclass(frozen=True)
class Weights:
    path: Path
    sha256: str
    spec: ModelSpec
    layout: str


def user_cache_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "watchtrain"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "watchtrain"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(configured: Path | None, url: str | None = DEFAULT_WEIGHTS_URL, log=None) -> Path:
    """Weights path: the configured one, $WATCHTRAIN_WEIGHTS, the user cache, else a download."""
    if configured is not None:
        if not Path(configured).is_file():
            raise WeightsError(f"weights file {configured} (configured with `weights` or --weights) does not exist")
        return Path(configured)
    env = os.environ.get("WATCHTRAIN_WEIGHTS")
    if env:
        if not Path(env).is_file():
            raise WeightsError(f"weights file {env} (from $WATCHTRAIN_WEIGHTS) does not exist")
        return Path(env)
    cached = user_cache_dir() / CACHE_FILENAME
    if cached.is_file():
        return cached
    if not url:
        raise WeightsError(_how_to_provide(cached))
    try:
        return download(url, cached, log=log)
    except OSError as exc:
        raise WeightsError(f"could not download weights from {url}: {exc}\n{_how_to_provide(cached)}") from exc


def _how_to_provide(cached: Path) -> str:
    return (
        "No MobileNetV2 weights found. Provide a MobileNetV2 .safetensors file (torchvision or timm layout) "
        f"in one of these ways: set `weights = \"/path/file.safetensors\"` in the config's [daemon] table, "
        f"or pass --weights, or set $WATCHTRAIN_WEIGHTS, or copy it to {cached}, "
        "or allow the download from `weights_url`."
    )


def download(url: str, dest: Path, log=None) -> Path:
    """Download to ``dest`` atomically (temp file + rename), with a progress display."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.download{dest.suffix}")  # mx.load goes by suffix
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, 0.0
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - last > 0.5 or done == total:
                    last = time.monotonic()
                    _progress(url, done, total, log)
            out.flush()
            os.fsync(out.fileno())
        _read(tmp)  # refuse to cache something that is not safetensors
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _progress(url: str, done: int, total: int, log) -> None:
    pct = f"{100 * done / total:5.1f}%" if total else "?"
    if sys.stderr.isatty():
        sys.stderr.write(f"\rdownloading weights {pct} {done / 1e6:7.1f} MB")
        if done == total:
            sys.stderr.write("\n")
    elif log is not None:
        log.info("weights_download_progress", url=url, bytes=done, total=total)


def _read(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def _timm_to_torchvision(key: str) -> str:
    """Map a timm ``mobilenetv2_100`` key to the torchvision name."""
    head = {"conv_stem.": "features.0.0.", "bn1.": "features.0.1.", "conv_head.": "features.18.0.",
            "bn2.": "features.18.1.", "classifier.": "classifier.1."}
    for prefix, target in head.items():
        if key.startswith(prefix):
            return target + key[len(prefix):]
    _, stage, block, module, rest = key.split(".", 4)
    index = 1 + sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING[: int(stage)]) + int(block)
    if stage == "0":  # depthwise-separable block: conv_dw, bn1, conv_pw, bn2
        names = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
    else:
        names = {"conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
                 "conv_pwl": "conv.2", "bn3": "conv.3"}
    return f"features.{index}.{names[module]}.{rest}"


def _fold(tensors: dict[str, mx.array], conv: str, bn: str) -> tuple[mx.array, mx.array]:
    """Fold inference-mode batch norm ``bn`` into convolution ``conv``; returns OHWI weight, bias."""
    w = tensors[f"{conv}.weight"]
    scale = tensors[f"{bn}.weight"] * mx.rsqrt(tensors[f"{bn}.running_var"] + BN_EPS)
    bias = tensors[f"{bn}.bias"] - tensors[f"{bn}.running_mean"] * scale
    w = w * scale.reshape(-1, 1, 1, 1)
    return w.transpose(0, 2, 3, 1), bias


def _from_torchvision(tv: dict[str, mx.array]) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}

    def put(name: str, conv: str, bn: str, matrix: bool = False) -> None:
        w, b = _fold(tv, conv, bn)
        out[f"{name}.weight"] = w.reshape(w.shape[0], -1) if matrix else w
        out[f"{name}.bias"] = b

    put("features.0", "features.0.0", "features.0.1")
    for i in range(1, 18):
        p = f"features.{i}.conv"
        if i == 1:
            put(f"features.{i}.depthwise", f"{p}.0.0", f"{p}.0.1")
            put(f"features.{i}.project", f"{p}.1", f"{p}.2", matrix=True)
        else:
            put(f"features.{i}.expand", f"{p}.0.0", f"{p}.0.1", matrix=True)
            put(f"features.{i}.depthwise", f"{p}.1.0", f"{p}.1.1")
            put(f"features.{i}.project", f"{p}.2", f"{p}.3", matrix=True)
    put("features.18", "features.18.0", "features.18.1", matrix=True)
    out["classifier.weight"] = tv["classifier.1.weight"]
    out["classifier.bias"] = tv["classifier.1.bias"]
    return out


def detect_layout(tensors: dict[str, mx.array]) -> str:
    if "features.1.depthwise.weight" in tensors:
        return "watchtrain"
    if "features.0.0.weight" in tensors:
        return "torchvision"
    if "conv_stem.weight" in tensors:
        return "timm"
    raise WeightsError("unknown key layout: expected torchvision, timm or watchtrain MobileNetV2 keys")


def spec_from(tensors: dict[str, mx.array], meta: dict[str, str]) -> ModelSpec:
    classifier = tensors.get("classifier.weight", tensors.get("classifier.1.weight"))
    return ModelSpec(
        padding=meta.get("padding", "symmetric"),
        normalization=meta.get("normalization", "imagenet"),
        num_classes=int(classifier.shape[0]) if classifier is not None else int(meta.get("num_classes", 1000)),
    )


def load(path: Path) -> tuple[MobileNetV2, Weights]:
    """Load weights from ``path`` into a new :class:`MobileNetV2` (eval mode)."""
    path = Path(path)
    tensors, meta = _read(path)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    layout = detect_layout(tensors)
    try:
        if layout == "timm":
            tensors = {_timm_to_torchvision(k): v for k, v in tensors.items()}
        if layout != "watchtrain":
            tensors = _from_torchvision(tensors)
        spec = spec_from(tensors, meta)
        model = MobileNetV2(spec)
        model.load_weights(list(tensors.items()), strict=True)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: not MobileNetV2 weights in {layout} layout ({exc})") from exc
    model.eval()
    mx.eval(model.parameters())
    return model, Weights(path=path, sha256=sha256_file(path), spec=spec, layout=layout)


def save_model(model: MobileNetV2, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save the (folded) model in watchtrain layout with its run spec as metadata."""
    meta = {
        "architecture": "mobilenet_v2",
        "layout": "watchtrain",
        "padding": model.spec.padding,
        "normalization": model.spec.normalization,
        "num_classes": str(model.spec.num_classes),
        **(metadata or {}),
    }
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())), metadata=meta)


def with_head(model: MobileNetV2, weight: mx.array, bias: mx.array) -> MobileNetV2:
    """A copy of ``model`` whose classifier is the given head."""
    spec = ModelSpec(model.spec.padding, model.spec.normalization, int(weight.shape[0]))
    out = MobileNetV2(spec)
    params = dict(tree_flatten(model.parameters()))
    params["classifier.weight"], params["classifier.bias"] = weight, bias
    out.update(tree_unflatten(list(params.items())))
    out.eval()
    return out
