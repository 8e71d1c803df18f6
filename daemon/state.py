"""Run history in SQLite (WAL): what ran, why, and how it ended; survives restarts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from service.store import SqliteStore


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunHistory(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path, [
            "CREATE TABLE IF NOT EXISTS run (id INTEGER PRIMARY KEY, project TEXT, reason TEXT,"
            " started_at TEXT, finished_at TEXT, status TEXT, version INTEGER, detail TEXT)",
            # A run left 'running' was interrupted by a crash or SIGKILL.
            "UPDATE run SET status = 'interrupted' WHERE status = 'running'",
        ])

    def start(self, project: str, reason: str) -> int:
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT INTO run (project, reason, started_at, status) VALUES (?, ?, ?, 'running')",
                (project, reason, _now()),
            )
            return int(cur.lastrowid)

    def finish(self, run_id: int, status: str, version: int | None = None, detail: str = "") -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE run SET finished_at = ?, status = ?, version = ?, detail = ? WHERE id = ?",
                (_now(), status, version, detail, run_id),
            )

    def recent(self, project: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        query = "SELECT * FROM run" + (" WHERE project = ?" if project else "") + " ORDER BY id DESC LIMIT ?"
        with self._lock:
            cur = self._db.execute(query, ((project,) if project else ()) + (limit,))
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
