"""A small SQLite store shared by the caches and the run history: WAL, one lock, many threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class SqliteStore:
    """Opens (creating) ``path`` in WAL mode and runs ``schema``; subclasses add queries."""

    def __init__(self, path: Path, schema: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses no committed row
            for statement in schema:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()
