"""Milliseconds per layer of the MobileNetV2 forward pass on real photos: each inverted residual
block fused (inference mode, one native kernel) against its separate steps (training mode:
the expand GEMM, the native depthwise step, the project GEMM), interleaved, best of --rounds.

    .venv/bin/python benchmarks/block_timing.py [--batch 16] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import service
import mlx.core as mx

from service import native, weights
from service.benchmark import decode_all
from service.dataset import photos_under

ROOT = Path(__file__).resolve().parent.parent
CLOTHING = ROOT.parent / "shared" / "datasets" / "clothing-small"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.safetensors"


def _ms(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=CLOTHING / "validation")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    service.cpu.use_buffer_cache()
    model, _ = weights.load(args.weights)
    x = mx.array(np.stack(decode_all(photos_under(args.images, args.batch))).astype(np.float32))
    inputs = [(x - model._mean) * model._inv_std]
    for layer in model.features:  # each layer's real input
        inputs.append(layer(inputs[-1]))
        mx.eval(inputs[-1])
    best: dict[str, list[float]] = {"fused": [], "separate": []}
    for i, layer in enumerate(model.features):
        fused = separate = float("inf")
        for _ in range(args.rounds):
            layer.eval()
            fused = min(fused, _ms(lambda: layer(inputs[i])))
            layer.train()  # the same arithmetic as separate steps (only blocks differ)
            separate = min(separate, _ms(lambda: layer(inputs[i])))
        layer.eval()
        best["fused"].append(round(fused, 2))
        best["separate"].append(round(separate, 2))
    print(json.dumps({"batch": args.batch, "native_kernel": native.status,
                      "layers_ms": best, "total_ms": {k: round(sum(v), 1) for k, v in best.items()}}, indent=2))


if __name__ == "__main__":
    main()
