"""Soak: 2,000 new photos arrive in bursts while the real daemon runs; SIGKILL in the middle.

Afterwards: the published model covers every photo, every photo was embedded
exactly once (across both daemon processes), and no temporary files remain.
New photos are real clothing photos made unique (small rotation + crop, re-encoded).

    .venv/bin/python benchmarks/soak.py [--photos 2000] [--bursts 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from service.embeddings import EmbeddingCache

ROOT = Path(__file__).resolve().parent.parent
CLOTHING = ROOT.parent / "shared" / "datasets" / "clothing-small"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.safetensors"
LABELS = ("hat", "pants", "shoes")


def variant(src: Path, dest: Path, i: int) -> None:
    img = Image.open(src).convert("RGB")
    w, h = img.size
    img = img.rotate((i % 7) - 3, expand=False).crop((i % 5, i % 3, w - (i % 4), h - (i % 6)))
    img.save(dest, quality=90)


def events(log: Path) -> list[dict]:
    return [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--bursts", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wt-soak-"))
    sources = {label: sorted((CLOTHING / "train" / label).glob("*.jpg")) for label in LABELS}
    for label in LABELS:
        (work / "data" / label).mkdir(parents=True)
        for photo in sources[label][:20]:
            (work / "data" / label / photo.name).write_bytes(photo.read_bytes())
    config = work / "watchtrain.toml"
    config.write_text(f'[daemon]\nstate_dir = "{work / "state"}"\nweights = "{WEIGHTS}"\nrescan_seconds = 30\n'
                      f'[[project]]\nname = "Soak"\ndataset = "{work / "data"}"\noutput = "{work / "out"}"\n'
                      'debounce_seconds = 2\nvalidation_fraction = 0.1\nverify_photos = 8\n')
    log = work / "daemon.log"

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)], cwd=ROOT,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    t0 = time.perf_counter()
    proc = start()
    per_burst = args.photos // args.bursts
    killed_after = None
    for burst in range(args.bursts):
        for j in range(per_burst):
            i = burst * per_burst + j
            label = LABELS[i % 3]
            src = sources[label][20 + (i // 3) % (len(sources[label]) - 20)]
            variant(src, work / "data" / label / f"soak-{i:05d}.jpg", i)
        time.sleep(3)
        if burst == args.bursts // 2 and killed_after is None:
            proc.send_signal(signal.SIGKILL)  # mid-stream, whatever the daemon was doing
            proc.wait()
            killed_after = burst
            proc = start()
    total = 60 + per_burst * args.bursts
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        try:
            manifest = json.loads((work / "out" / "Soak.json").read_text())
            if manifest["n_train"] + manifest["n_val"] == total:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    cache = EmbeddingCache(work / "state" / "embeddings.sqlite")
    cached, most = cache.embed_counts()
    cache.close()
    tmp_left = list((work / "out" / ".watchtrain" / "tmp").iterdir())
    result = {
        "photos_total": total,
        "published_version": manifest["version"],
        "model_covers": manifest["n_train"] + manifest["n_val"],
        "embeddings_cached": cached,
        "most_times_one_photo_was_embedded": most,
        "embedded_in_logs": sum(e["count"] for e in events(log) if e["event"] == "embedded"),
        "runs_started": sum(1 for e in events(log) if e["event"] == "run_started"),
        "killed_after_burst": killed_after,
        "temporary_files_left": len(tmp_left),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["ok"] = result["model_covers"] == total and cached == total and most == 1 and not tmp_left
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
