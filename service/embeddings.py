"""Frozen-backbone embeddings, cached in SQLite by content hash and weights fingerprint.

An unchanged photo is never decoded or embedded twice, across runs and
restarts: the cache key is (sha256 of the file's bytes, sha256 of the backbone
weights). A second table remembers each file's (size, mtime) -> sha256 so that
unchanged files are not even re-read to hash them.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import service  # noqa: F401
import mlx.core as mx

from service.dataset import Photo
from service.images import ImageError, load_rgb
from service.mobilenet import FEATURE_DIM, MobileNetV2
from service.store import SqliteStore

BATCH_SIZE = 16
DECODE_WORKERS = 2


class Cancelled(Exception):
    """The run was asked to stop (daemon shutdown)."""


@dataclass
class EmbedReport:
    embedded: list[str] = field(default_factory=list)  # paths embedded this run
    cached: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why
    seconds: float = 0.0


class EmbeddingCache(SqliteStore):
    """SQLite (WAL) store; safe to use from several threads of one process."""

    def __init__(self, path: Path):
        super().__init__(path, [
            "CREATE TABLE IF NOT EXISTS file_hash (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)",
            "CREATE TABLE IF NOT EXISTS embedding (sha256 TEXT, weights TEXT, vector BLOB,"
            " times INTEGER DEFAULT 1, PRIMARY KEY (sha256, weights))",
        ])
        with self._lock, self._db:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(embedding)")}
            if "times" not in columns:  # caches written before the counter existed
                self._db.execute("ALTER TABLE embedding ADD COLUMN times INTEGER DEFAULT 1")

    def content_hash(self, photo: Photo) -> str:
        """sha256 of the photo's bytes, reusing the stored one while size and mtime match."""
        key = str(photo.path)
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, sha256 FROM file_hash WHERE path = ?", (key,)
            ).fetchone()
        if row and row[0] == photo.size and row[1] == photo.mtime_ns:
            return row[2]
        digest = hashlib.sha256(photo.path.read_bytes()).hexdigest()
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO file_hash VALUES (?, ?, ?, ?)",
                (key, photo.size, photo.mtime_ns, digest),
            )
        return digest

    def get(self, sha: str, weights: str) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute(
                "SELECT vector FROM embedding WHERE sha256 = ? AND weights = ?", (sha, weights)
            ).fetchone()
        return np.frombuffer(row[0], dtype=np.float32) if row else None

    def embed_counts(self) -> tuple[int, int]:
        """(number of cached embeddings, largest number of times one was computed)."""
        with self._lock:
            count, most = self._db.execute("SELECT count(*), coalesce(max(times), 0) FROM embedding").fetchone()
        return int(count), int(most)

    def put_many(self, items: list[tuple[str, np.ndarray]], weights: str) -> None:
        with self._lock, self._db:
            # `times` counts how often a (photo, backbone) pair was computed: the soak
            # benchmark and tests check that it stays 1.
            self._db.executemany(
                "INSERT INTO embedding (sha256, weights, vector) VALUES (?, ?, ?) ON CONFLICT (sha256, weights)"
                " DO UPDATE SET vector = excluded.vector, times = times + 1",
                [(sha, weights, np.asarray(v, np.float32).tobytes()) for sha, v in items],
            )


def _decode(photo: Photo) -> np.ndarray | ImageError:
    try:
        return load_rgb(photo.path)
    except ImageError as exc:
        return exc


def _prefetch(pool: ThreadPoolExecutor, photos: list[Photo], ahead: int) -> Iterator[np.ndarray | ImageError]:
    """Decoded photos in order, keeping at most ``ahead`` decodes in flight (bounded memory)."""
    pending: deque = deque()
    for photo in photos:
        pending.append(pool.submit(_decode, photo))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(photos: list[Photo], size: int) -> Iterator[list[Photo]]:
    for i in range(0, len(photos), size):
        yield photos[i : i + size]


def embed(
    model: MobileNetV2,
    weights_sha: str,
    photos: list[Photo],
    cache: EmbeddingCache,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_skip: Callable[[Photo, str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    batch_size: int = BATCH_SIZE,
) -> tuple[dict[str, np.ndarray], dict[str, str], EmbedReport]:
    """Embeddings for ``photos``: ``({path: vector}, {path: sha256}, report)``.

    Photos that cannot be read are reported in ``report.skipped`` and left out.
    Decoding runs in a thread pool, overlapped with the model.
    """
    start = time.perf_counter()
    report = EmbedReport()
    vectors: dict[str, np.ndarray] = {}
    hashes: dict[str, str] = {}
    todo: list[Photo] = []
    for photo in photos:
        try:
            if photo.size < 0:
                photo.path.stat()  # raises the reason (e.g. a symlink loop)
            sha = cache.content_hash(photo)
        except OSError as exc:
            _skip(report, photo, f"{photo.path}: cannot be read ({exc.strerror or exc})", on_skip)
            continue
        hashes[str(photo.path)] = sha
        cached = cache.get(sha, weights_sha)
        if cached is not None:
            vectors[str(photo.path)] = cached
            report.cached += 1
        else:
            todo.append(photo)

    forward = mx.compile(model.embed)
    skipped_before = len(report.skipped)
    with ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode") as pool:
        decoded = _prefetch(pool, todo, ahead=3 * batch_size)
        for batch in _batches(todo, batch_size):
            if should_stop():
                raise Cancelled()
            pixels, kept = [], []
            for photo in batch:
                result = next(decoded)
                if isinstance(result, ImageError):
                    _skip(report, photo, str(result), on_skip)
                    hashes.pop(str(photo.path), None)
                else:
                    pixels.append(result)
                    kept.append(photo)
            if not kept:
                continue
            out = np.array(forward(mx.array(np.stack(pixels).astype(np.float32))))
            cache.put_many([(hashes[str(p.path)], v) for p, v in zip(kept, out)], weights_sha)
            for photo, vector in zip(kept, out):
                vectors[str(photo.path)] = vector
                report.embedded.append(str(photo.path))
            if on_progress is not None:
                on_progress(len(report.embedded) + len(report.skipped) - skipped_before, len(todo))
    report.seconds = time.perf_counter() - start
    assert all(v.shape == (FEATURE_DIM,) for v in vectors.values())
    return vectors, hashes, report


def _skip(report: EmbedReport, photo: Photo, why: str, on_skip) -> None:
    report.skipped[str(photo.path)] = why
    if on_skip is not None:
        on_skip(photo, why)
