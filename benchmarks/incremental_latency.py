"""Latency of the real daemon on clothing-small: first model, then 5 added photos.

Starts `watchtrain run` on a folder of symlinks to the 3,068 training photos (fresh
state, cold embedding cache), waits for the first published model (the full first
training, head only), copies 5 new photos into `hat/` (mirrored training photos: new
bytes) and measures from the end of the debounce window (`run_requested`) to
`published`, with the run's phases (embed, train, export, verify, publish) from its
`published` log line. Peak RSS is the daemon's VmHWM. Prints one JSON object.

    .venv/bin/python benchmarks/incremental_latency.py [--debounce 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.nightly_clothing import CLOTHING, WEIGHTS, symlink_farm  # noqa: E402


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def wait_for(log: Path, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(log):
            if predicate(event):
                return event
        time.sleep(0.2)
    raise TimeoutError(f"no matching event in {log} after {timeout} s")


def stamp(event: dict) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debounce", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wt-latency-"))
    symlink_farm(CLOTHING / "train", work / "train")
    config = work / "watchtrain.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{work / "state"}"\nweights = "{WEIGHTS}"\n\n'
        f'[[project]]\nname = "Clothing"\ndataset = "{work / "train"}"\nvalidation = "{CLOTHING / "validation"}"\n'
        f'output = "{work / "out"}"\ndebounce_seconds = {args.debounce}\nsettle_seconds = 1\n')
    log = work / "daemon.log"
    start = time.monotonic()
    with open(log, "w") as sink:
        daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                                  cwd=ROOT, stdout=sink, stderr=sink)
    try:
        first = wait_for(log, lambda e: e["event"] == "published", timeout=1800)
        first_seconds = time.monotonic() - start
        first_rss = peak_rss_mb(daemon.pid)
        for i, photo in enumerate(sorted((CLOTHING / "train" / "hat").glob("*.jpg"))[:5]):
            ImageOps.mirror(Image.open(photo)).save(work / "train" / "hat" / f"new-{i}.jpg", quality=92)
        second = wait_for(log, lambda e: e["event"] == "published" and e.get("version") == first["version"] + 1,
                          timeout=600)
        requested = [e for e in events(log) if e["event"] == "run_requested" and stamp(e) < stamp(second)][-1]
        embedded = [e for e in events(log) if e["event"] == "embedded"][-1]
        result = {
            "first_model": {"seconds_from_start": round(first_seconds, 1), "val_accuracy": first.get("val_accuracy"),
                            "peak_rss_mb": round(first_rss), "phases": first.get("phases")},
            "five_new_photos": {
                "seconds_after_debounce": round(stamp(second) - stamp(requested), 2),
                "embedded": embedded.get("count"), "cached": embedded.get("cached"),
                "val_accuracy": second.get("val_accuracy"),
                "phases": second.get("phases"),
            },
            "peak_rss_mb": round(peak_rss_mb(daemon.pid)),
            "native_kernel": next((e.get("native_kernel") for e in events(log) if e["event"] == "run_started"), None),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
