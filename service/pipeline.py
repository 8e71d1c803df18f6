"""One training run: files -> dataset -> embeddings -> head -> export -> publish.

The daemon and the one-shot CLI both call :func:`run`. A run that fails at any
step leaves the published model untouched.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import service
import mlx.core as mx

from service import dataset as ds
from service import evaluation, export, weights
from service.embeddings import EmbeddingCache, embed
from service.export import ExportOptions
from service.publish import MLX_WEIGHTS, Publisher, write_json_atomic
from service.training import HeadSettings, train_head
from service.weights import DEFAULT_WEIGHTS_URL


@dataclass(frozen=True)
class Job:
    """What to train and where to publish it."""

    name: str
    dataset: Path
    output: Path
    state_dir: Path
    validation: Path | None = None
    weights: Path | None = None
    weights_url: str | None = DEFAULT_WEIGHTS_URL
    validation_fraction: float = 0.1
    keep_versions: int = 5
    head: HeadSettings = HeadSettings()
    export: ExportOptions = ExportOptions()


@dataclass
class RunResult:
    status: str  # "published" | "unchanged"
    manifest: dict[str, Any] | None
    metrics: dict[str, Any]
    metrics_path: Path
    embedded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def scan(job: Job) -> tuple[list[ds.Photo], list[ds.Photo]]:
    """(train, validation) photos on disk now."""
    photos = ds.scan_folder(job.dataset)
    if job.validation is not None:
        return photos, ds.scan_folder(job.validation)
    return ds.split(photos, job.validation_fraction)


def fingerprint(train: list[ds.Photo], val: list[ds.Photo], hashes: dict[str, str]) -> str:
    """Content fingerprint of a dataset: labels, split and bytes of every photo."""
    digest = hashlib.sha256()
    for side, photos in (("train", train), ("val", val)):
        for p in sorted(photos, key=lambda p: p.relpath):
            digest.update(f"{side}\t{p.relpath}\t{hashes.get(str(p.path), '')}\n".encode())
    return digest.hexdigest()


def _matrix(vectors: dict[str, np.ndarray], photos: list[ds.Photo], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {label: i for i, label in enumerate(labels)}
    kept = [p for p in photos if str(p.path) in vectors and p.label in index]
    x = np.stack([vectors[str(p.path)] for p in kept]) if kept else np.zeros((0, 1280), np.float32)
    return x.astype(np.float32), np.array([index[p.label] for p in kept], dtype=np.int64)


def _predict(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x @ weight.T + bias).argmax(axis=1) if len(x) else np.zeros(0, dtype=np.int64)


def run(
    job: Job,
    *,
    reason: str = "manual",
    log: Any,
    should_stop: Callable[[], bool] = lambda: False,
    force: bool = True,
) -> RunResult:
    """Train and publish ``job``; ``force=False`` skips when the dataset is unchanged."""
    run_id = dt.datetime.now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    log = log.bind(project=job.name, run_id=run_id)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    publisher = Publisher(job.output, job.name, job.keep_versions)
    if removed := publisher.clean_tmp():
        log.info("removed_stale_staging", count=removed)

    mark = time.perf_counter()
    model, w = weights.load(weights.resolve(job.weights, job.weights_url, log=log))
    phases["load_weights"] = time.perf_counter() - mark

    mark = time.perf_counter()
    train, val = scan(job)
    phases["scan"] = time.perf_counter() - mark
    log.info("run_started", reason=reason, n_train_files=len(train), n_val_files=len(val),
             weights=str(w.path), weights_layout=w.layout, blas=service.blas.loaded)

    cache = EmbeddingCache(job.state_dir / "embeddings.sqlite")
    try:
        mark = time.perf_counter()
        vectors, hashes, report = embed(
            model, w.sha256, train + val, cache, should_stop=should_stop,
            on_skip=lambda photo, why: log.warning("photo_skipped", file=str(photo.path), reason=why),
        )
        phases["embed"] = time.perf_counter() - mark
    finally:
        cache.close()
    if report.embedded:
        log.info("embedded", count=len(report.embedded), cached=report.cached,
                 files=report.embedded[:50], seconds=round(report.seconds, 3))

    train = [p for p in train if str(p.path) in vectors]
    val = [p for p in val if str(p.path) in vectors]
    labels = list(ds.labels_of(train))
    ds.check_labels(tuple(labels), job.dataset)
    dropped = sorted({p.label for p in val} - set(labels))
    if dropped:
        log.warning("validation_labels_without_training_photos", labels=dropped)
    print_fp = fingerprint(train, val, hashes)
    previous = publisher.current()
    if not force and previous and previous.get("dataset_fingerprint") == print_fp \
            and previous.get("weights_sha256") == w.sha256:
        log.info("run_skipped_unchanged", version=previous["version"])
        return RunResult("unchanged", previous, {}, Path(), report.embedded, report.skipped)

    x_train, y_train = _matrix(vectors, train, labels)
    x_val, y_val = _matrix(vectors, val, labels)

    init = _warm_start(publisher, previous, labels, w.sha256)
    mark = time.perf_counter()
    head = train_head(x_train, y_train, x_val, y_val, len(labels), job.head, init=init, should_stop=should_stop)
    phases["train"] = time.perf_counter() - mark
    train_metrics = evaluation.metrics(y_train, _predict(head.weight, head.bias, x_train), labels)
    val_metrics = evaluation.metrics(y_val, _predict(head.weight, head.bias, x_val), labels)
    log.info("trained", epochs=head.epochs_run, best_epoch=head.best_epoch, stop_reason=head.stop_reason,
             train_accuracy=train_metrics["accuracy"], val_accuracy=val_metrics["accuracy"],
             warm_start=init is not None, seconds=round(phases["train"], 3))

    version = publisher.next_version()
    trained_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    summary = {
        "train_accuracy": train_metrics["accuracy"],
        "val_accuracy": val_metrics["accuracy"],
        "epochs": head.epochs_run,
        "best_epoch": head.best_epoch,
        "stop_reason": head.stop_reason,
    }
    manifest = {
        "name": job.name,
        "version": version,
        "labels": labels,
        "trained_at": trained_at,
        "reason": reason,
        "metrics": summary,
        "n_train": int(len(y_train)),
        "n_val": int(len(y_val)),
        "weights_sha256": w.sha256,
        "dataset_fingerprint": print_fp,
        "precision": job.export.precision,
        "minimum_deployment_target": job.export.minimum_target,
        "watchtrain_version": service.__version__,
    }

    mark = time.perf_counter()
    final = weights.with_head(model, mx.array(head.weight), mx.array(head.bias))
    staged = publisher.staging()
    options = _export_options(job.export, manifest)
    export.export(final, labels, staged / f"{job.name}.mlpackage", options)
    weights.save_model(final, staged / MLX_WEIGHTS, {"labels": "\n".join(labels), "version": str(version)})
    phases["export"] = time.perf_counter() - mark

    mark = time.perf_counter()
    manifest = publisher.publish(staged, manifest)
    phases["publish"] = time.perf_counter() - mark
    phases["total"] = time.perf_counter() - t0

    metrics = {
        "run_id": run_id,
        "project": job.name,
        "reason": reason,
        "version": version,
        "labels": labels,
        "counts": {"train": int(len(y_train)), "val": int(len(y_val)), "embedded": len(report.embedded),
                   "cached": report.cached, "skipped": len(report.skipped)},
        "per_label_counts": {l: int((y_train == i).sum()) for i, l in enumerate(labels)},
        "train": train_metrics,
        "validation": val_metrics,
        "training": {**summary, "warm_start": init is not None, "settings": asdict(job.head),
                     "history": head.history},
        "skipped_files": report.skipped,
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
    }
    metrics_path = _write_metrics(job, publisher, version, run_id, metrics)
    log.info("published", version=version, package=str(publisher.package), val_accuracy=summary["val_accuracy"],
             metrics_file=str(metrics_path), phases=metrics["phases_seconds"])
    return RunResult("published", manifest, metrics, metrics_path, report.embedded, report.skipped)


def _warm_start(publisher: Publisher, previous: dict | None, labels: list[str],
                weights_sha: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The published head when its labels and backbone match this run's."""
    if not previous or previous.get("labels") != labels or previous.get("weights_sha256") != weights_sha:
        return None
    try:
        tensors = mx.load(str(publisher.mlx_weights(previous["version"])))
    except (OSError, ValueError, RuntimeError):
        return None
    return np.array(tensors["classifier.weight"]), np.array(tensors["classifier.bias"])


def _export_options(base: ExportOptions, manifest: dict[str, Any]) -> ExportOptions:
    meta = {
        "labels": ",".join(manifest["labels"]),
        "trained_at": manifest["trained_at"],
        "dataset_fingerprint": manifest["dataset_fingerprint"],
        "val_accuracy": str(manifest["metrics"]["val_accuracy"]),
        "watchtrain_version": manifest["watchtrain_version"],
        "weights_sha256": manifest["weights_sha256"],
        "watchtrain_model_version": str(manifest["version"]),
    }
    return ExportOptions(
        precision=base.precision, minimum_target=base.minimum_target, author=base.author,
        license=base.license, description=base.description, version=str(manifest["version"]),
        metadata={**base.metadata, **meta},
    )


def _write_metrics(job: Job, publisher: Publisher, version: int, run_id: str, metrics: dict) -> Path:
    path = job.state_dir / "runs" / job.name / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics)
    write_json_atomic(publisher.version_dir(version) / "metrics.json", metrics)
    return path
