"""Core ML model size and accuracy at FP32, FP16 and 8-bit weights on clothing-small.

Trains the head once (embeddings cached in --state-dir), exports the three
variants, and scores each saved package on every validation photo by running its
program with watchtrain's NumPy verifier (Core ML itself needs macOS).

    .venv/bin/python benchmarks/export_variants.py --state-dir /tmp/wt-bench
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog

from service import export, pipeline, verify, weights
from service.dataset import scan_folder
from service.images import load_rgb
from service.predict import probabilities_of_pixels

ROOT = Path(__file__).resolve().parent.parent
CLOTHING = ROOT.parent / "shared" / "datasets" / "clothing-small"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.safetensors"


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, default=Path(tempfile.gettempdir()) / "watchtrain-bench")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp())
    job = pipeline.Job(name="Clothing", dataset=CLOTHING / "train", validation=CLOTHING / "validation",
                       output=out, state_dir=args.state_dir, weights=WEIGHTS)
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet
    result = pipeline.run(job, log=structlog.get_logger())
    labels = result.manifest["labels"]
    model, _ = weights.load(out / ".watchtrain" / "versions" / "Clothing" / "v000001" / "model.safetensors")
    photos = scan_folder(CLOTHING / "validation")
    truth = np.array([labels.index(p.label) for p in photos])
    pixels = [load_rgb(p.path) for p in photos]
    mlx_acc = float((probabilities_of_pixels(model, pixels).argmax(1) == truth).mean())
    rows = {"mlx_float32": {"val_accuracy": round(mlx_acc, 4)}}
    for name, options in {
        "float32": export.ExportOptions(precision="float32"),
        "float16": export.ExportOptions(precision="float16"),
        "int8_weights": export.ExportOptions(weight_bits=8, minimum_target="iOS16"),
    }.items():
        package = export.export(model, labels, out / name / "Clothing.mlpackage", options)
        program = verify.load_program(package)
        start = time.perf_counter()
        probs = np.concatenate([verify.run_program(program, np.stack(pixels[i : i + 16]).transpose(0, 3, 1, 2))
                                for i in range(0, len(pixels), 16)])
        rows[name] = {"bytes": package_bytes(package), "mb": round(package_bytes(package) / 1e6, 2),
                      "val_accuracy": round(float((probs.argmax(1) == truth).mean()), 4),
                      "numpy_eval_seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({"n_val": len(photos), **rows}, indent=2))


if __name__ == "__main__":
    main()
