"""Head-only, nightly deep fine-tune, then 5 added photos, on clothing-small.

The dataset is a folder of symlinks to ../shared (so photos can be added); the 5
new photos are mirrored copies of training photos (new bytes, never validation
photos). Prints one JSON object with accuracies, times and embedding counts.

    .venv/bin/python benchmarks/nightly_clothing.py [--state-dir DIR] [--blocks K] [--epochs N] [--views V]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import structlog
from PIL import Image, ImageOps

from service import pipeline
from service.augment import AugmentSettings
from service.finetune import FinetuneSettings

ROOT = Path(__file__).resolve().parent.parent
CLOTHING = ROOT.parent / "shared" / "datasets" / "clothing-small"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.safetensors"


def symlink_farm(src: Path, dest: Path) -> None:
    for photo in sorted(src.rglob("*.jpg")):
        target = dest / photo.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(photo)


def summary(result: pipeline.RunResult, seconds: float) -> dict:
    m = result.metrics
    return {"status": result.status, "val_accuracy": m["validation"]["accuracy"],
            "train_accuracy": m["train"]["accuracy"], "embedded": m["counts"]["embedded"],
            "epochs": m["training"]["epochs"], "stop_reason": m["training"]["stop_reason"],
            "seconds": round(seconds, 1), "phases": m.get("phases_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, help="reuse an embedding/feature cache (default: fresh)")
    parser.add_argument("--blocks", type=int, default=FinetuneSettings.blocks)
    parser.add_argument("--epochs", type=int, default=FinetuneSettings.epochs)
    parser.add_argument("--views", type=int, default=AugmentSettings.views)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wt-nightly-"))
    symlink_farm(CLOTHING / "train", work / "train")
    job = pipeline.Job(name="Clothing", dataset=work / "train", validation=CLOTHING / "validation",
                       output=work / "out", state_dir=args.state_dir or work / "state", weights=WEIGHTS,
                       finetune=FinetuneSettings(blocks=args.blocks, epochs=args.epochs,
                                                 augment=AugmentSettings(views=args.views)))
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    log = structlog.get_logger()
    out = {"settings": {"blocks": args.blocks, "epochs": args.epochs, "views": args.views}}
    for name, kwargs in (("head_only", {}), ("nightly", {"mode": "nightly", "reason": "schedule"})):
        start = time.perf_counter()
        out[name] = summary(pipeline.run(job, log=log, **kwargs), time.perf_counter() - start)
    for i, photo in enumerate(sorted((CLOTHING / "train" / "hat").glob("*.jpg"))[:5]):
        ImageOps.mirror(Image.open(photo)).save(work / "train" / "hat" / f"new-{i}.jpg", quality=92)
    start = time.perf_counter()
    out["after_5_new_photos"] = summary(pipeline.run(job, log=log, reason="change", force=False),
                                        time.perf_counter() - start)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
