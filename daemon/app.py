"""The daemon: watchers, schedules and the work queue around :func:`service.pipeline.run`.

Nothing a project does can stop the daemon: a failed run is logged and retried
with backoff (the published model stays), a dataset folder that disappears pauses
its project until it comes back, and a periodic rescan catches events the watcher
missed (overflow, network volumes).
"""

from __future__ import annotations

import fcntl
import signal
import threading
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from daemon import logs
from daemon.config import Config, Project
from daemon.state import RunHistory
from daemon.watcher import Debouncer, watch
from daemon.worker import Worker
import service.cpu
from service import pipeline
from service.embeddings import Cancelled

STOP_TIMEOUT_SECONDS = 10
RETRY_MAX_SECONDS = 3600.0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = logs.get("watchtrain.daemon")
        self.projects: dict[str, Project] = {p.job.name: p for p in config.projects}
        self.stop_event = threading.Event()
        self.history = RunHistory(config.state_dir / "state.sqlite")
        self.worker = Worker(self._train, self.log)
        self.scheduler = BackgroundScheduler()
        self.observer = Observer()
        self.debouncers: dict[str, Debouncer] = {}
        self.watches: dict[str, list[ObservedWatch]] = {}
        self.paused: set[str] = set()
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- runs -----------------------------------------------------------------

    def _train(self, name: str, reason: str) -> None:
        project = self.projects[name]
        if not self._available(name):
            return
        run_id = self.history.start(name, reason)
        try:
            result = pipeline.run(
                project.job, reason=reason, log=self.log, should_stop=self.stop_event.is_set,
                # Event-driven, start-up and rescan runs skip when the data did not really change.
                force=reason in ("schedule", "resume", "manual"),
                mode="nightly" if reason in ("schedule", "resume") else "incremental",
            )
        except Cancelled:
            self.history.finish(run_id, "cancelled")
            self.log.info("run_cancelled", project=name)
        except Exception as exc:  # noqa: BLE001 - any failure: log, keep the model, retry later
            self.history.finish(run_id, "failed", detail=str(exc))
            self._retry_later(name, reason, exc)
        else:
            self.failures.pop(name, None)
            self.history.finish(run_id, result.status, version=(result.manifest or {}).get("version"))
            if result.retry_after:
                # Photos still being written were left out; look again once they settle
                # (through the debouncer, so a copy still in progress keeps deferring it).
                self._later(result.retry_after, self.debouncers[name].poke)
        finally:
            service.cpu.release_memory()  # idle until the next run: give MLX's buffer cache back

    def _retry_later(self, name: str, reason: str, exc: Exception) -> None:
        attempt = self.failures.get(name, 0)
        self.failures[name] = attempt + 1
        delay = min(RETRY_MAX_SECONDS, self.config.retry_seconds * 2**attempt)
        self.log.error("run_failed", project=name, reason=reason, error=str(exc), error_type=type(exc).__name__,
                       retry_in_seconds=delay, attempt=attempt + 1)
        # A nightly run that failed is retried as a nightly run (it resumes from its checkpoint).
        self._later(delay, self.worker.request, name, "resume" if reason in ("schedule", "resume") else "retry")

    def _later(self, seconds: float, fn, *args) -> None:
        timer = threading.Timer(seconds, fn, args=args)
        timer.daemon = True
        timer.start()

    # -- folders --------------------------------------------------------------

    def _roots(self, project: Project) -> list[Path]:
        job = project.job
        return [job.dataset] + ([job.validation] if job.validation else [])

    def _available(self, name: str) -> bool:
        """False (and the project paused) while one of its folders is missing."""
        missing = [str(r) for r in self._roots(self.projects[name]) if not r.is_dir()]
        with self._lock:
            if missing and name not in self.paused:
                self.paused.add(name)
                self.log.warning("project_paused", project=name, missing=missing,
                                 hint="resumes when the folder is back (checked every rescan)")
            return not missing

    def _watch(self, name: str) -> None:
        project = self.projects[name]
        for old in self.watches.pop(name, []):
            try:
                self.observer.unschedule(old)
            except KeyError:
                pass
        self.watches[name] = watch(self.observer, self._roots(project), self.debouncers[name], self.log)

    def rescan(self) -> None:
        """Resume paused projects whose folders are back; catch missed events everywhere."""
        for name, project in self.projects.items():
            if not all(r.is_dir() for r in self._roots(project)):
                self._available(name)  # logs the pause once
                continue
            with self._lock:
                resumed = name in self.paused
                self.paused.discard(name)
            if resumed:
                self.log.info("project_resumed", project=name)
                self._watch(name)
            if not self.debouncers[name].pending:  # else files are arriving: the debounced run follows
                self.worker.request(name, "rescan")

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.worker.start()
        for name, project in self.projects.items():
            self.debouncers[name] = Debouncer(project.debounce_seconds,
                                              lambda n=name: self.worker.request(n, "change"))
            if self._available(name):
                self._watch(name)
            self.scheduler.add_job(
                self.worker.request, CronTrigger.from_crontab(project.schedule), args=[name, "schedule"],
                id=f"nightly:{name}", coalesce=True, misfire_grace_time=3600,
            )
        self.scheduler.add_job(self.rescan, IntervalTrigger(seconds=self.config.rescan_seconds), id="rescan",
                               coalesce=True, max_instances=1)
        self.observer.start()
        self.scheduler.start()
        for name, project in self.projects.items():
            job = self.scheduler.get_job(f"nightly:{name}")
            self.log.info("project_watching", project=name, dataset=str(project.job.dataset),
                          output=str(project.job.output), schedule=project.schedule,
                          next_scheduled_run=str(job.next_run_time))
            # Catch up with whatever changed while the daemon was not running, and finish a
            # nightly fine-tune that a stop or crash interrupted (it resumes from its checkpoint).
            interrupted = (project.job.state_dir / "checkpoints" / name / "checkpoint.json").exists()
            self.worker.request(name, "resume" if interrupted else "startup")

    def stop(self) -> None:
        self.stop_event.set()
        for debouncer in self.debouncers.values():
            debouncer.cancel()
        self.scheduler.shutdown(wait=False)
        self.observer.stop()
        if not self.worker.stop(STOP_TIMEOUT_SECONDS):
            self.log.warning("worker_did_not_stop_in_time", seconds=STOP_TIMEOUT_SECONDS)
        self.observer.join(STOP_TIMEOUT_SECONDS)
        self.history.close()

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT; returns the process exit code (1: another daemon holds the state)."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.config.state_dir / "daemon.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log.error("already_running", state_dir=str(self.config.state_dir),
                           hint="another watchtrain daemon uses this state_dir; stop it first")
            return 1
        def on_signal(signum: int, _frame) -> None:
            self.log.info("stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.log.info("daemon_started", config=str(self.config.path), state_dir=str(self.config.state_dir),
                      projects=list(self.projects))
        self.start()
        while not self.stop_event.wait(1.0):
            pass
        self.stop()
        self.log.info("daemon_stopped")
        return 0
