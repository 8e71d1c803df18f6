"""The work queue: one run at a time, exactly one follow-up for changes during a run."""

from __future__ import annotations

import threading
import time

import structlog

from daemon.worker import Worker


def _wait(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_changes_during_a_run_cause_exactly_one_follow_up():
    release = threading.Event()
    calls: list[tuple[str, str]] = []

    def run(project: str, reason: str) -> None:
        calls.append((project, reason))
        if len(calls) == 1:
            release.wait(10)

    worker = Worker(run, structlog.get_logger())
    worker.start()
    worker.request("A", "change")
    assert _wait(lambda: len(calls) == 1)
    for _ in range(5):
        worker.request("A", "change")  # arrive while A trains
    worker.request("B", "change")
    release.set()
    assert _wait(worker.idle)
    assert calls == [("A", "change"), ("A", "change"), ("B", "change")]
    worker.stop(5)


def test_stronger_reason_wins_when_merged_and_crashes_do_not_stop_the_worker():
    gate = threading.Event()
    calls: list[tuple[str, str]] = []

    def run(project: str, reason: str) -> None:
        calls.append((project, reason))
        if project == "busy":
            gate.wait(10)
        if project == "boom":
            raise RuntimeError("bad run")

    worker = Worker(run, structlog.get_logger())
    worker.start()
    worker.request("busy", "manual")
    assert _wait(lambda: calls)
    worker.request("boom", "change")
    worker.request("A", "change")
    worker.request("A", "schedule")
    gate.set()
    assert _wait(worker.idle)
    assert calls[1:] == [("boom", "change"), ("A", "schedule")]
    worker.request("A", "change")
    assert _wait(lambda: len(calls) == 4)
    assert worker.stop(5)
