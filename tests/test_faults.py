"""Fault injection against the real daemon process: kills, vanishing folders, bad outputs, floods."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.publish import tree_sha256
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


class Daemon:
    """The real `watchtrain run` process on a config written for a test."""

    def __init__(self, tmp: Path, data: dict[str, Path], weights: Path, *, debounce: float = 1.0,
                 output: Path | None = None, warm: Path | None = None, rescan: float = 1.0):
        self.tmp, self.state = tmp, tmp / "state"
        self.out = output or tmp / "out"
        self.state.mkdir(exist_ok=True)
        if warm is not None:
            shutil.copy2(warm, self.state / "embeddings.sqlite")
        self.config = tmp / "watchtrain.toml"
        self.config.write_text(f"""
[daemon]
state_dir = "{self.state}"
weights = "{weights}"
rescan_seconds = {rescan}
retry_seconds = 1
[[project]]
name = "P"
dataset = "{data['train']}"
validation = "{data['val']}"
output = "{self.out}"
debounce_seconds = {debounce}
settle_seconds = 0.5
verify_photos = 4
""")
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        """Start the process and wait until it is up (signal handlers installed): events of an
        earlier process in the same log must not stand in for this one's."""
        started = len(self.events("daemon_started")) if self.log.exists() else 0
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(self.config)], cwd=ROOT,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.wait(lambda: len(self.events("daemon_started")) > started, timeout=120)
        return self

    def events(self, name: str | None = None) -> list[dict]:
        rows = [json.loads(l) for l in self.log.read_text().splitlines() if l.startswith("{")]
        return [r for r in rows if name is None or r["event"] == name]

    def version(self) -> int:
        try:
            return json.loads((self.out / "P.json").read_text())["version"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    def wait(self, predicate, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=20) == 0

    def consistent(self, clean: bool = True) -> dict:
        """The published package is exactly what its manifest says; ``clean``: nothing left in staging."""
        manifest = json.loads((self.out / "P.json").read_text())
        assert manifest["package_sha256"] == tree_sha256(self.out / "P.mlpackage")
        if clean:
            assert list((self.out / ".watchtrain" / "tmp").iterdir()) == []
        return manifest


@pytest.fixture
def daemon(subset, weights_path, tmp_path):
    made: list[Daemon] = []

    def make(**kw) -> Daemon:
        d = Daemon(tmp_path, subset, weights_path, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()


@pytest.mark.parametrize("moment", ["embedded", "trained", "verified"])
def test_sigkill_at_any_point_then_restart_finishes_the_work(daemon, subset, moment):
    d = daemon().start()
    d.wait(lambda: d.version() == 1)
    for photo in subset["extra"].iterdir():
        shutil.copy2(photo, subset["train"] / "hat" / photo.name)
    # Kill the second run at the chosen moment: after embedding, after training (export
    # running), after verification (publishing).
    d.wait(lambda: len(d.events(moment)) >= 2 or d.version() == 2)
    d.kill()
    killed_at_version = d.version()
    if killed_at_version == 1:
        assert d.consistent(clean=False)["version"] == 1  # the old model is intact (staging may remain)
    d.start()
    d.wait(lambda: d.version() == 2 and any(e.get("reason") == "startup" for e in d.events("run_started")))
    d.wait(lambda: d.events("run_skipped_unchanged") or len(d.events("published")) >= 2)
    manifest = d.consistent()
    assert manifest["version"] == 2 and manifest["n_train"] == 50
    # Every photo was embedded exactly once across both processes.
    embedded = [f for e in d.events("embedded") for f in e["files"]]
    assert len(embedded) == len(set(embedded))
    from service.embeddings import EmbeddingCache

    cache = EmbeddingCache(d.state / "embeddings.sqlite")
    assert cache.embed_counts() == (65, 1)  # 45 + 15 + 5 photos, none computed twice
    cache.close()
    d.stop()
    runs = sqlite3.connect(d.state / "state.sqlite").execute("SELECT status FROM run").fetchall()
    assert ("running",) not in runs


def test_dataset_folder_disappears_and_comes_back(daemon, subset, tmp_path):
    d = daemon(warm=None).start()
    d.wait(lambda: d.version() == 1)
    parked = tmp_path / "parked"
    shutil.move(subset["train"], parked)  # unmounted, renamed, deleted...
    d.wait(lambda: d.events("project_paused"))
    assert d.consistent()["version"] == 1
    shutil.move(parked, subset["train"])
    for photo in subset["extra"].iterdir():
        shutil.copy2(photo, subset["train"] / "hat" / photo.name)
    d.wait(lambda: d.events("project_resumed"))
    d.wait(lambda: d.version() == 2)
    assert d.consistent()["n_train"] == 50
    # watching again after the folder came back
    for photo in list((subset["train"] / "pants").iterdir())[:2]:
        photo.unlink()
    d.wait(lambda: d.version() == 3)
    d.stop()


def test_unwritable_output_fails_then_retries(daemon, subset, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    d = daemon(output=blocker).start()
    d.wait(lambda: len(d.events("run_failed")) >= 2)  # failed, retried with backoff, failed again
    failed = d.events("run_failed")
    assert failed[1]["retry_in_seconds"] == 2 * failed[0]["retry_in_seconds"]
    assert "out" in failed[0]["error"]
    blocker.unlink()
    d.wait(lambda: d.version() == 1, timeout=240)
    d.consistent()
    d.stop()


def test_a_thousand_photos_start_one_run(daemon, subset):
    d = daemon(debounce=3.0, rescan=60.0).start()  # only the watcher and the debouncer at work
    d.wait(lambda: d.version() == 1)
    before = len(d.events("run_started"))
    sources = sorted((subset["train"] / "hat").iterdir())
    burst = subset["train"] / "hat" / "burst"
    burst.mkdir()
    for i in range(1000):
        shutil.copyfile(sources[i % len(sources)], burst / f"copy-{i:04d}.jpg")
    d.wait(lambda: d.version() == 2, timeout=300)
    time.sleep(4)  # a second run would have started by now
    started = d.events("run_started")[before:]
    assert [e["reason"] for e in started if e["reason"] == "change"] == ["change"]
    assert d.consistent()["n_train"] == 1045
    d.stop()


def test_second_daemon_on_the_same_state_refuses_to_start(daemon):
    d = daemon().start()
    d.wait(lambda: d.version() == 1)
    second = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(d.config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "already_running" in second.stderr
    assert d.proc.poll() is None  # the first one is unaffected
    d.stop()
