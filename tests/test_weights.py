"""MobileNetV2 in MLX with the real ImageNet weights."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from service import weights
from service.images import load_rgb
from tests.conftest import SAMPLES

EXPECTED_TOP1 = {
    "bird.bmp": 20,  # chickadee
    "cat.bmp": 286,  # Egyptian cat
    "grace_hopper.bmp": 653,  # military uniform
    "dragonfly.bmp": 320,  # dragonfly
    "missvickie_potato_chips.bmp": 693,  # packet
}


def _samples() -> mx.array:
    return mx.array(np.stack([load_rgb(SAMPLES / name) for name in EXPECTED_TOP1]).astype(np.float32))


def test_metadata_is_honoured(imagenet_model):
    _, info = imagenet_model
    assert (info.spec.padding, info.spec.normalization, info.spec.num_classes) == ("tf_same", "inception", 1001)
    assert info.layout == "torchvision"
    assert info.sha256 == "baffa95ad5122c3bc0f6ae5a2bad666cd9f87df5b6f25468b64aab57708a921f"


def test_imagenet_samples_get_their_labels(imagenet_model):
    model, _ = imagenet_model
    probs = np.array(mx.softmax(model(_samples()), axis=-1))
    labels = (SAMPLES / "imagenet_labels.txt").read_text().splitlines()
    got = {name: int(p.argmax()) for name, p in zip(EXPECTED_TOP1, probs)}
    assert got == EXPECTED_TOP1, {n: labels[i] for n, i in got.items()}
    assert probs.max(axis=1).min() > 0.5


def test_symmetric_padding_changes_predictions(weights_path, tmp_path):
    """The metadata matters: the same tensors run with symmetric padding give other outputs."""
    tensors, meta = mx.load(str(weights_path), return_metadata=True)
    mx.save_safetensors(str(tmp_path / "sym.safetensors"), tensors, metadata={**meta, "padding": "symmetric"})
    sym, info = weights.load(tmp_path / "sym.safetensors")
    ref, _ = weights.load(weights_path)
    x = _samples()
    assert info.spec.padding == "symmetric"
    assert not np.allclose(np.array(sym(x)), np.array(ref(x)), atol=1e-2)


def _to_timm(key: str) -> str | None:
    """Inverse of the loader's mapping, written independently from torchvision's block order."""
    fixed = {"features.0.0.": "conv_stem.", "features.0.1.": "bn1.", "features.18.0.": "conv_head.",
             "features.18.1.": "bn2.", "classifier.1.": "classifier."}
    for prefix, target in fixed.items():
        if key.startswith(prefix):
            return target + key[len(prefix):]
    stage_sizes = [1, 2, 3, 4, 3, 3, 1]
    index = int(key.split(".")[1])
    rest = key.split(".", 3)[3]  # after "features.N.conv."
    stage, block = 0, index - 1
    while block >= stage_sizes[stage]:
        block -= stage_sizes[stage]
        stage += 1
    if index == 1:
        names = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
    else:
        names = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
    module, param = rest.rsplit(".", 1)
    return f"blocks.{stage}.{block}.{names[module]}.{param}"


def test_timm_layout_gives_identical_outputs(weights_path, tmp_path):
    tensors, meta = mx.load(str(weights_path), return_metadata=True)
    timm = {_to_timm(k): v for k, v in tensors.items()}
    timm["bn1.num_batches_tracked"] = mx.array(0)
    mx.save_safetensors(str(tmp_path / "timm.safetensors"), timm, metadata=meta)
    model, info = weights.load(tmp_path / "timm.safetensors")
    ref, _ = weights.load(weights_path)
    assert info.layout == "timm"
    x = _samples()
    np.testing.assert_allclose(np.array(model(x)), np.array(ref(x)), rtol=0, atol=1e-4)


def test_no_metadata_means_symmetric_imagenet(weights_path, tmp_path):
    tensors = mx.load(str(weights_path))
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), tensors)
    _, info = weights.load(tmp_path / "plain.safetensors")
    assert (info.spec.padding, info.spec.normalization) == ("symmetric", "imagenet")


def test_saved_model_round_trips(imagenet_model, tmp_path):
    model, _ = imagenet_model
    weights.save_model(model, tmp_path / "m.safetensors")
    again, info = weights.load(tmp_path / "m.safetensors")
    assert info.layout == "watchtrain" and info.spec == model.spec
    x = _samples()
    np.testing.assert_array_equal(np.array(again(x)), np.array(model(x)))


def test_resolution_order(weights_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WATCHTRAIN_WEIGHTS", str(weights_path))
    other = tmp_path / "configured.safetensors"
    other.write_bytes(weights_path.read_bytes())
    assert weights.resolve(other, url=None) == other  # config first
    assert weights.resolve(None, url=None) == weights_path  # then the environment
    monkeypatch.delenv("WATCHTRAIN_WEIGHTS")
    cached = weights.user_cache_dir() / weights.CACHE_FILENAME
    with pytest.raises(weights.WeightsError, match="WATCHTRAIN_WEIGHTS"):
        weights.resolve(None, url=None)  # nothing anywhere: says how to provide them
    # Then the download, here from a file:// URL (no network on CI), written atomically.
    got = weights.resolve(None, url=weights_path.as_uri())
    assert got == cached and cached.read_bytes() == weights_path.read_bytes()
    assert list(cached.parent.iterdir()) == [cached]  # no temporary file left
    assert weights.resolve(None, url=None) == cached  # later: the cache


def test_bad_weights_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(weights.WeightsError, match="junk.safetensors"):
        weights.load(junk)
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.resolve(tmp_path / "missing.safetensors")
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"foo.weight": mx.zeros((2,))})
    with pytest.raises(weights.WeightsError, match="unknown key layout"):
        weights.load(tmp_path / "other.safetensors")


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("WATCHTRAIN_WEIGHTS", raising=False)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(weights.WeightsError):
        weights.resolve(None, url=bad.as_uri())
    assert not (weights.user_cache_dir() / weights.CACHE_FILENAME).exists()
    assert list(weights.user_cache_dir().iterdir()) == []
