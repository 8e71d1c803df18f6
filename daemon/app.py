"""The daemon: watchers, nightly schedule and the work queue around :func:`service.pipeline.run`."""

from __future__ import annotations

import signal
import threading

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from watchdog.observers import Observer

from daemon import logs
from daemon.config import Config, Project
from daemon.state import RunHistory
from daemon.watcher import Debouncer, watch
from daemon.worker import Worker
from service import pipeline
from service.dataset import DatasetError
from service.embeddings import Cancelled

STOP_TIMEOUT_SECONDS = 10


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

    def _train(self, name: str, reason: str) -> None:
        project = self.projects[name]
        run_id = self.history.start(name, reason)
        try:
            result = pipeline.run(
                project.job, reason=reason, log=self.log, should_stop=self.stop_event.is_set,
                # Event-driven and start-up runs skip when the data did not really change.
                force=reason in ("schedule", "resume", "manual"),
                mode="nightly" if reason in ("schedule", "resume") else "incremental",
            )
        except Cancelled:
            self.history.finish(run_id, "cancelled")
            self.log.info("run_cancelled", project=name)
        except (DatasetError, OSError, ValueError, RuntimeError) as exc:
            # The published model stays; the next change or schedule tries again.
            self.history.finish(run_id, "failed", detail=str(exc))
            self.log.error("run_failed", project=name, reason=reason, error=str(exc),
                           error_type=type(exc).__name__)
        else:
            version = (result.manifest or {}).get("version")
            self.history.finish(run_id, result.status, version=version)

    def start(self) -> None:
        self.worker.start()
        for name, project in self.projects.items():
            job = project.job
            debouncer = Debouncer(project.debounce_seconds, lambda n=name: self.worker.request(n, "change"))
            self.debouncers[name] = debouncer
            roots = [job.dataset] + ([job.validation] if job.validation else [])
            watch(self.observer, roots, debouncer, self.log)
            self.scheduler.add_job(
                self.worker.request, CronTrigger.from_crontab(project.schedule), args=[name, "schedule"],
                id=f"nightly:{name}", coalesce=True, misfire_grace_time=3600,
            )
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
        """Run until SIGTERM or SIGINT; returns the process exit code."""
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

