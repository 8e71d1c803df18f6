"""``watchtrain bench``: throughput of each stage on real photos, against PyTorch in the same process.

Every figure is images per second over the same photos and batch; when PyTorch is
importable (the ``bench`` extra) the same MobileNetV2 with the same weights runs
beside MLX and the ratio MLX/PyTorch is reported, so numbers from noisy machines
compare like with like. The float32 matmul GFLOPS says how fast the machine is.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import service
import mlx.core as mx
import mlx.optimizers as optim

from service import native
from service.dataset import photos_under
from service.embeddings import BATCH_SIZE, DECODE_WORKERS
from service.finetune import N_FEATURES, Tail
from service.training import compiled_step
from service.images import ImageError, load_rgb
from service.mobilenet import MobileNetV2


def _rate(fn: Callable[[], Any], items: int, min_seconds: float, warmup: int = 1) -> float:
    """Items per second of ``fn`` (run ``warmup`` times first, then at least twice and ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < min_seconds:
        fn()
        runs += 1
    return items * runs / (time.perf_counter() - start)


def matmul_gflops(n: int = 2048, min_seconds: float = 1.0) -> float:
    """float32 GEMM throughput as MLX sees it (with the BLAS watchtrain loaded)."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b)
    return _rate(lambda: mx.eval(a @ b), 2 * n**3, min_seconds) / 1e9


def decode_all(paths: list[Path]) -> list[np.ndarray]:
    """Decode and resize in the same worker pool the embedding stage uses; unreadable files left out."""
    def one(path: Path) -> np.ndarray | None:
        try:
            return load_rgb(path)
        except ImageError:
            return None

    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        return [x for x in pool.map(one, paths) if x is not None]


def _mlx_train_step(model: MobileNetV2, split: int, n_labels: int) -> Callable[[mx.array, mx.array], None]:
    """The nightly fine-tuning step itself (service.training.compiled_step): AdamW on the tail."""
    own = MobileNetV2(model.spec)  # training replaces the tail's arrays: keep the caller's model as it was
    own.update(model.parameters())
    tail = Tail(own, split, n_labels, dropout=0.2)
    tail.train()
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=1e-4)
    optimizer.init(tail.trainable_parameters())
    step, state = compiled_step(tail, optimizer, label_smoothing=0.1)
    return lambda x, y: mx.eval(step(x, y), state)


Workload = tuple[Callable[[], Any], int]  # (one call, images it processes)


def run(images: Path, *, photos: int = 64, batch: int = BATCH_SIZE, train_batch: int = 64, blocks: int = 3,
        min_seconds: float = 3.0, rounds: int = 2, model: MobileNetV2, torch_peer: bool = True) -> dict[str, Any]:
    """Measure every stage on up to ``photos`` photos from ``images``; see the module docstring.

    MLX and PyTorch take turns for ``rounds`` rounds and each keeps its best figure, so
    neither is favoured by running first or by a burst of load from elsewhere.
    """
    service.cpu.use_buffer_cache()
    native.kernel()
    paths = photos_under(images, photos)
    start = time.perf_counter()
    pixels = decode_all(paths)
    decode_ips = len(paths) / (time.perf_counter() - start)
    if len(pixels) < batch:
        raise FileNotFoundError(f"need at least {batch} readable photos under {images}, found {len(pixels)}")
    x = np.stack(pixels[:batch]).astype(np.float32)
    split = N_FEATURES - 1 - blocks
    workloads, embeddings = _mlx_workloads(model, x, split, train_batch)
    peer: dict[str, Any] = {}
    if torch_peer:
        peer = _torch_workloads(model, x, split, train_batch)
        workloads.update(peer.pop("workloads", {}))
    best = dict.fromkeys(workloads, 0.0)
    for _ in range(rounds):
        for name, (fn, items) in workloads.items():
            best[name] = max(best[name], _rate(fn, items, min_seconds))
    out: dict[str, Any] = {
        "photos": len(paths), "batch": batch, "train_batch": train_batch, "blocks": blocks, "rounds": rounds,
        "blas": service.cpu.loaded, "native_kernel": native.status, "mlx_device": str(mx.default_device()),
        "decode": {"ips": round(decode_ips, 2), "workers": DECODE_WORKERS},
        "torch": peer.get("torch"),
    }
    for stage in ("embed", "train_step"):
        mlx_ips, torch_ips = best[f"mlx_{stage}"], best.get(f"torch_{stage}")
        out[stage] = {"mlx_ips": round(mlx_ips, 2), "torch_ips": round(torch_ips, 2) if torch_ips else None,
                      "ratio": round(mlx_ips / torch_ips, 3) if torch_ips else None}
    if "embeddings" in peer:
        out["embed"]["max_abs_diff_vs_torch"] = float(np.abs(peer["embeddings"] - embeddings).max())
    out["matmul_gflops"] = round(matmul_gflops(), 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def _mlx_workloads(model: MobileNetV2, x: np.ndarray, split: int,
                   train_batch: int) -> tuple[dict[str, Workload], np.ndarray]:
    xm = mx.array(x)
    embed = mx.compile(model.embed)
    front = mx.compile(lambda a: model.backbone(a, 0, split))
    feats = mx.concatenate([front(xm)] * -(-train_batch // len(x)))[:train_batch]
    labels = mx.array(np.arange(train_batch) % 10, dtype=mx.int32)
    mx.eval(feats)
    step = _mlx_train_step(model, split, 10)
    return ({"mlx_embed": (lambda: mx.eval(embed(xm)), len(x)),
             "mlx_train_step": (lambda: step(feats, labels), train_batch)}, np.array(embed(xm)))


def _torch_workloads(model: MobileNetV2, x: np.ndarray, split: int, train_batch: int) -> dict[str, Any]:
    """The same embedding and fine-tuning step in PyTorch, or {} where it is not installed."""
    try:
        import torch
    except ImportError:
        return {}
    from service.torch_peer import TorchMobileNetV2

    # channels_last measured fastest for PyTorch on this CPU (oneDNN): compare with its best.
    peer = TorchMobileNetV2(model).eval().to(memory_format=torch.channels_last)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        embeddings = peer.embed(xt).numpy()
        feats = torch.cat([peer.backbone(xt, 0, split)] * -(-train_batch // len(x)))[:train_batch]
    feats = feats.clone().contiguous(memory_format=torch.channels_last)  # a normal tensor, outside inference mode
    labels = torch.arange(train_batch) % 10
    head = torch.nn.Linear(1280, 10)
    trainable = [p for k, p in peer.params.items() if k.startswith("features_") and int(k.split("_")[1]) >= split]
    for p in peer.params.values():
        p.requires_grad_(any(p is q for q in trainable))
    optimizer = torch.optim.AdamW(trainable + list(head.parameters()), lr=1e-4, weight_decay=1e-4)
    dropout = torch.nn.Dropout(0.2)

    def embed() -> None:
        with torch.inference_mode():
            peer.embed(xt)

    def step() -> None:  # the same step as service.training.compiled_step
        optimizer.zero_grad(set_to_none=True)
        logits = head(dropout(peer.backbone(feats, split).mean(dim=(2, 3))))
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1).backward()
        optimizer.step()

    return {"workloads": {"torch_embed": (embed, len(x)), "torch_train_step": (step, train_batch)},
            "embeddings": embeddings, "torch": {"version": torch.__version__, "threads": torch.get_num_threads()}}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024
