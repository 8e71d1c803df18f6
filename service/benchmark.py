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
from service.dataset import is_candidate
from service.embeddings import BATCH_SIZE, DECODE_WORKERS
from service.finetune import N_FEATURES, Tail, train_step
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


def find_photos(folder: Path, limit: int) -> list[Path]:
    photos = sorted(p for p in folder.rglob("*") if p.is_file() and is_candidate(p.name))
    if not photos:
        raise FileNotFoundError(f"no photos under {folder}")
    return photos[:limit]


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
    """The nightly fine-tuning step itself (service.finetune.train_step): AdamW on the tail."""
    own = MobileNetV2(model.spec)  # training replaces the tail's arrays: keep the caller's model as it was
    own.update(model.parameters())
    tail = Tail(own, split, n_labels, dropout=0.2)
    tail.train()
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=1e-4)
    optimizer.init(tail.trainable_parameters())
    step, state = train_step(tail, optimizer, label_smoothing=0.1)
    return lambda x, y: mx.eval(step(x, y), state)


def run(images: Path, *, photos: int = 64, batch: int = BATCH_SIZE, train_batch: int = 64, blocks: int = 3,
        min_seconds: float = 3.0, model: MobileNetV2, torch_peer: bool = True) -> dict[str, Any]:
    """Measure every stage on up to ``photos`` photos from ``images``; see the module docstring."""
    service.cpu.use_buffer_cache()
    native.kernel()
    paths = find_photos(images, photos)
    start = time.perf_counter()
    pixels = decode_all(paths)
    decode_ips = len(paths) / (time.perf_counter() - start)
    if len(pixels) < batch:
        raise FileNotFoundError(f"need at least {batch} readable photos under {images}, found {len(pixels)}")
    x = np.stack(pixels[:batch]).astype(np.float32)
    xm = mx.array(x)
    embed = mx.compile(model.embed)
    mx_embed_ips = _rate(lambda: mx.eval(embed(xm)), batch, min_seconds)
    embeddings = np.array(embed(xm))

    split = N_FEATURES - 1 - blocks
    front = mx.compile(lambda a: model.backbone(a, 0, split))
    feats = mx.concatenate([front(xm)] * -(-train_batch // batch))[:train_batch]
    labels = mx.array(np.arange(train_batch) % 10, dtype=mx.int32)
    mx.eval(feats)
    step = _mlx_train_step(model, split, 10)
    mx_train_ips = _rate(lambda: step(feats, labels), train_batch, min_seconds)

    out: dict[str, Any] = {
        "photos": len(paths), "batch": batch, "train_batch": train_batch, "blocks": blocks,
        "blas": service.cpu.loaded, "native_kernel": native.status, "mlx_device": str(mx.default_device()),
        "decode": {"ips": round(decode_ips, 2), "workers": DECODE_WORKERS},
        "embed": {"mlx_ips": round(mx_embed_ips, 2), "torch_ips": None, "ratio": None},
        "train_step": {"mlx_ips": round(mx_train_ips, 2), "torch_ips": None, "ratio": None},
        "torch": None,
    }
    if torch_peer:
        out.update(_torch_figures(model, x, embeddings, split, train_batch, min_seconds, out))
    out["matmul_gflops"] = round(matmul_gflops(), 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def _torch_figures(model: MobileNetV2, x: np.ndarray, mlx_embeddings: np.ndarray, split: int, train_batch: int,
                   min_seconds: float, out: dict[str, Any]) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    from service.torch_peer import TorchMobileNetV2

    peer = TorchMobileNetV2(model).eval()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        agreement = float(np.abs(peer.embed(xt).numpy() - mlx_embeddings).max())
        torch_embed_ips = _rate(lambda: peer.embed(xt), len(x), min_seconds)
        reps = -(-train_batch // len(x))
        feats = torch.cat([peer.backbone(xt, 0, split)] * reps)[:train_batch].contiguous()
    labels = torch.arange(train_batch) % 10
    head = torch.nn.Linear(1280, 10)
    trainable = [p for k, p in peer.params.items() if k.startswith("features_") and int(k.split("_")[1]) >= split]
    for p in peer.params.values():
        p.requires_grad_(any(p is q for q in trainable))
    optimizer = torch.optim.AdamW(trainable + list(head.parameters()), lr=1e-4, weight_decay=1e-4)
    dropout = torch.nn.Dropout(0.2)

    def step() -> None:  # the same step as service.finetune.train_step
        optimizer.zero_grad(set_to_none=True)
        logits = head(dropout(peer.backbone(feats, split).mean(dim=(2, 3))))
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1).backward()
        optimizer.step()

    torch_train_ips = _rate(step, train_batch, min_seconds)
    embed = dict(out["embed"], torch_ips=round(torch_embed_ips, 2), ratio=round(out["embed"]["mlx_ips"] / torch_embed_ips, 3),
                 max_abs_diff_vs_torch=agreement)
    train = dict(out["train_step"], torch_ips=round(torch_train_ips, 2),
                 ratio=round(out["train_step"]["mlx_ips"] / torch_train_ips, 3))
    return {"embed": embed, "train_step": train,
            "torch": {"version": torch.__version__, "threads": torch.get_num_threads()}}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024
