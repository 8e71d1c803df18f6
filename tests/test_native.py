"""watchtrain's MLX CPU kernel: built, used, equal to the pure-MLX formulation, and optional."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from service import native
from service.finetune import N_FEATURES, Tail
from service.images import load_rgb
from tests.conftest import ROOT, SAMPLES

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the kernel is built on Linux only")


def _samples() -> mx.array:
    names = sorted(p for p in SAMPLES.iterdir() if p.suffix == ".bmp")
    return mx.array(np.stack([load_rgb(p) for p in names]).astype(np.float32))


@linux_only
def test_kernel_is_built_and_used_on_linux():
    assert native.kernel() is not None, native.status
    assert native.status.startswith("loaded ")


@linux_only
def test_kernel_equals_the_reference_on_real_photos(imagenet_model, monkeypatch):
    model, _ = imagenet_model
    x = _samples()
    fast = np.array(model(x))
    monkeypatch.setattr(native, "kernel", lambda: None)
    reference = np.array(model(x))
    assert np.abs(fast - reference).max() < 1e-3 * np.abs(reference).max()
    assert (fast.argmax(1) == reference.argmax(1)).all()


@linux_only
def test_inference_runs_each_block_as_one_fused_kernel(imagenet_model, monkeypatch):
    model, _ = imagenet_model
    calls: dict[str, int] = {}
    real = native.kernel()

    class Counting:  # the real kernel module, counting which entry points the model calls
        def __getattr__(self, name):
            calls[name] = calls.get(name, 0) + 1
            return getattr(real, name)

    monkeypatch.setattr(native, "kernel", Counting)
    model(_samples())
    assert calls == {"stem3x3_relu6": 1, "inverted_residual": 17, "pointwise_relu6": 1}


@linux_only
@pytest.mark.parametrize("training", [False, True], ids=["fused-blocks", "training-mode"])
def test_fine_tuning_gradients_equal_the_reference(imagenet_model, monkeypatch, training):
    """Through the fused block's gradient (eval mode) and through the separate steps the nightly
    fine-tune differentiates (training mode): both must equal pure MLX's."""
    model, _ = imagenet_model
    split = N_FEATURES - 1 - 3
    features = model.backbone(_samples(), 0, split)
    mx.random.seed(0)  # the head's initialization
    tail = Tail(model, split, n_labels=3, dropout=0.0)
    tail.train(training)
    labels = mx.array([0, 1, 2, 0, 1])

    def grads() -> dict[str, np.ndarray]:
        loss = lambda m: nn.losses.cross_entropy(m(features), labels, reduction="mean")  # noqa: E731
        _, g = nn.value_and_grad(tail, loss)(tail)
        return {k: np.array(v) for k, v in tree_flatten(g)}

    try:
        fast = grads()
        monkeypatch.setattr(native, "kernel", lambda: None)
        reference = grads()
    finally:
        tail.eval()  # the layers are the shared model's
    assert fast.keys() == reference.keys() and any("depthwise" in k for k in fast)
    for key in fast:
        # Summation order differs, so a value on relu6's edge (0 or 6) may pass its gradient in one
        # and not the other: a few elements differ, a wrong kernel differs everywhere. Hence a
        # relative norm over the whole tensor rather than an elementwise bound. (Alone: about 1e-6;
        # after the rest of the suite, with MLX's buffer cache warm, up to 2.6e-3 was seen. A
        # wrong gradient is off by order 1.)
        error = np.linalg.norm(fast[key] - reference[key]) / (np.linalg.norm(reference[key]) + 1e-12)
        assert error <= 1e-2, (key, error)


def test_turned_off_it_falls_back_and_still_classifies(weights_path):
    script = (
        "import numpy as np, mlx.core as mx\n"
        "from service import native, weights\n"
        "from service.images import load_rgb\n"
        f"model, _ = weights.load({str(weights_path)!r})\n"
        f"x = mx.array(load_rgb(__import__('pathlib').Path({str(SAMPLES / 'bird.bmp')!r}))[None].astype(np.float32))\n"
        "print(native.kernel() is None, int(np.array(model(x)).argmax()), native.status)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WATCHTRAIN_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    off, top1, status = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (off, top1) == ("True", "20") and "disabled" in status  # 20: chickadee


@linux_only
def test_a_kernel_that_does_not_build_is_reported_and_skipped(tmp_path, monkeypatch):
    broken = tmp_path / "native"
    shutil.copytree(native.SOURCE_DIR, broken)
    (broken / "kernels.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE_DIR", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module, status = native._load()
    assert module is None
    assert status.startswith("unavailable: RuntimeError") and "failed" in status


def test_bench_reports_every_figure(capsys, weights_path):
    from daemon.cli import main

    code = main(["bench", "--images", str(SAMPLES), "--weights", str(weights_path), "--photos", "5", "--batch", "4", "--train-batch", "8",
                 "--seconds", "0.1", "--rounds", "1", "--no-torch", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decode"]["ips"] > 0 and result["matmul_gflops"] > 0 and result["peak_rss_mb"] > 0
    for key in ("embed", "train_step"):
        assert result[key]["mlx_ips"] > 0
        assert result[key]["torch_ips"] is None and result[key]["ratio"] is None
