"""The work queue: one training at a time, at most one follow-up per project.

A request for a project that is already queued is merged into that entry; a
request that arrives while the project is training queues exactly one follow-up
run. Training is CPU- and memory-bound, so projects run one after another.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

# When requests merge, the stronger reason wins (a nightly run retrains fully).
PRIORITY = {"change": 0, "rescan": 0, "retry": 1, "startup": 1, "manual": 2, "schedule": 3, "resume": 3}


class Worker:
    def __init__(self, run: Callable[[str, str], None], log) -> None:
        self._run = run
        self._log = log
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._running: str | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self, project: str, reason: str) -> None:
        with self._cond:
            if self._stopping:
                return
            previous = self._pending.get(project)
            if previous is None or PRIORITY.get(reason, 0) > PRIORITY.get(previous, 0):
                self._pending[project] = reason
            self._log.info("run_requested", project=project, reason=reason,
                           queued=list(self._pending), running=self._running)
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return self._running is None and not self._pending

    def stop(self, timeout: float | None = None) -> bool:
        """Drop queued work, let the running job see the stop flag; True if the thread ended."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                project, reason = self._pending.popitem(last=False)
                self._running = project
            try:
                self._run(project, reason)
            except Exception:  # a failed run must never stop the daemon
                self._log.exception("run_crashed", project=project, reason=reason)
            finally:
                with self._cond:
                    self._running = None
