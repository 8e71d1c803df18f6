"""The real daemon process on real photos: start, publish, react to changes, stop cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _version(manifest: Path) -> int:
    try:
        return json.loads(manifest.read_text())["version"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"daemon exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s:\n{log.read_text()[-4000:]}")


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)], cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(proc: subprocess.Popen, sig: int) -> float:
    start = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0
    return time.monotonic() - start


def test_daemon_end_to_end(subset, weights_path, warm_embeddings, tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    shutil.copy2(warm_embeddings, state / "embeddings.sqlite")
    config = tmp_path / "watchtrain.toml"
    config.write_text(f"""
[daemon]
state_dir = "{state}"
weights = "{weights_path}"
[[project]]
name = "Subset"
dataset = "{subset['train']}"
validation = "{subset['val']}"
output = "{out}"
debounce_seconds = 1
""")
    log = tmp_path / "daemon.log"
    manifest = out / "Subset.json"
    proc = _start(config, log)
    try:
        _wait_for(lambda: _version(manifest) == 1, 180, proc, log)
        assert (out / "Subset.mlpackage" / "Manifest.json").is_file()

        # Photos arrive: exactly those are embedded and version 2 is published.
        for photo in subset["extra"].iterdir():
            shutil.copy2(photo, subset["train"] / "hat" / photo.name)
        _wait_for(lambda: _version(manifest) == 2, 180, proc, log)
        embedded = [e for e in _events(log) if e["event"] == "embedded"]
        assert embedded[-1]["count"] == 5
        assert sorted(Path(f).name for f in embedded[-1]["files"]) == sorted(p.name for p in subset["extra"].iterdir())
        assert json.loads(manifest.read_text())["n_train"] == 50
        assert _stop(proc, signal.SIGTERM) < 15
    finally:
        if proc.poll() is None:
            proc.kill()

    events = _events(log)
    assert events[-1]["event"] == "daemon_stopped"
    assert all(e["level"] in ("info", "debug") for e in events), [e for e in events if e["level"] != "info"]

    # A change made while the daemon is stopped is trained on the next start.
    next(iter((subset["train"] / "pants").iterdir())).unlink()
    proc = _start(config, log)
    try:
        _wait_for(lambda: _version(manifest) == 3, 180, proc, log)
        assert json.loads(manifest.read_text())["n_train"] == 49
        assert _stop(proc, signal.SIGINT) < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list((out / ".watchtrain" / "tmp").iterdir()) == []
    assert sorted(p.name for p in (state / "runs" / "Subset").iterdir()).__len__() == 3
