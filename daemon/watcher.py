"""watchdog observers on the dataset folders, debounced into run requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedNoWriteEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from service.dataset import is_relevant


class Debouncer:
    """Calls ``fire()`` once ``seconds`` have passed without another ``poke()``."""

    def __init__(self, seconds: float, fire: Callable[[], None]) -> None:
        self._seconds = seconds
        self._fire = fire
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def poke(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self._seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    @property
    def pending(self) -> bool:
        """A change was seen and its run has not been requested yet."""
        with self._lock:
            return self._timer is not None and self._timer.is_alive()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


class DatasetEventHandler(FileSystemEventHandler):
    """Pokes the debouncer for photo and label-folder changes under ``roots``."""

    def __init__(self, roots: list[Path], debouncer: Debouncer, log) -> None:
        self._roots = roots
        self._debouncer = debouncer
        self._log = log

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)):
            return
        paths = [Path(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        if any(is_relevant(p, root) for p in paths for root in self._roots):
            self._log.debug("dataset_event", kind=event.event_type, path=str(paths[0]))
            self._debouncer.poke()


def watch(observer: Observer, roots: list[Path], debouncer: Debouncer, log) -> list[ObservedWatch]:
    handler = DatasetEventHandler(roots, debouncer, log)
    return [observer.schedule(handler, str(root), recursive=True) for root in roots]
