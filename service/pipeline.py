"""One training run: files -> dataset -> embeddings -> head -> export -> verify -> gate -> publish.

The daemon and the one-shot CLI both call :func:`run`. A run that fails, is
stopped, or is refused by the quality gate leaves the published model untouched;
every run that gets as far as training writes a metrics JSON file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
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
from service import evaluation, export, verify, weights
from service.embeddings import EmbeddingCache, embed
from service.export import ExportOptions
from service.images import load_rgb
from service.predict import probabilities_of_pixels
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
    quality_tolerance: float = 0.01  # may lose at most 1 point of validation accuracy
    verify_photos: int = 16  # photos the exported package is checked on before publishing
    head: HeadSettings = HeadSettings()
    export: ExportOptions = ExportOptions()


@dataclass
class RunResult:
    status: str  # "published" | "unchanged" | "rejected"
    manifest: dict[str, Any] | None
    metrics: dict[str, Any]
    metrics_path: Path | None
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


def matrix(vectors: dict[str, np.ndarray], photos: list[ds.Photo], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked embeddings and label indices of ``photos`` whose label is in ``labels``."""
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
    warm_start: bool = True,
) -> RunResult:
    """Train and publish ``job``.

    ``force=False`` skips when the dataset is unchanged; ``warm_start=False`` trains
    the head from scratch (nightly runs), the quality gate still guarding the result.
    """
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

    mark = time.perf_counter()
    cache = EmbeddingCache(job.state_dir / "embeddings.sqlite")
    try:
        vectors, hashes, report = embed(
            model, w.sha256, train + val, cache, should_stop=should_stop,
            on_skip=lambda photo, why: log.warning("photo_skipped", file=str(photo.path), reason=why),
        )
    finally:
        cache.close()
    phases["embed"] = time.perf_counter() - mark
    log.info("embedded", count=len(report.embedded), cached=report.cached, skipped=len(report.skipped),
             files=report.embedded[:50], seconds=round(report.seconds, 3))

    train = [p for p in train if str(p.path) in vectors]
    val = [p for p in val if str(p.path) in vectors]
    labels = list(ds.labels_of(train))
    ds.check_labels(tuple(labels), job.dataset)
    if dropped := sorted({p.label for p in val} - set(labels)):
        log.warning("validation_labels_without_training_photos", labels=dropped)
    data_fp = fingerprint(train, val, hashes)
    previous = publisher.current()
    if not force and previous and previous.get("dataset_fingerprint") == data_fp \
            and previous.get("weights_sha256") == w.sha256:
        log.info("run_skipped_unchanged", version=previous["version"])
        return RunResult("unchanged", previous, {}, None, report.embedded, report.skipped)

    x_train, y_train = matrix(vectors, train, labels)
    x_val, y_val = matrix(vectors, val, labels)
    baseline = _published_head(publisher, previous, w.sha256)
    init = baseline if warm_start and baseline is not None and previous.get("labels") == labels else None
    mark = time.perf_counter()
    head = train_head(x_train, y_train, x_val, y_val, len(labels), job.head, init=init, should_stop=should_stop)
    phases["train"] = time.perf_counter() - mark
    train_metrics = evaluation.metrics(y_train, _predict(head.weight, head.bias, x_train), labels)
    val_metrics = evaluation.metrics(y_val, _predict(head.weight, head.bias, x_val), labels)
    log.info("trained", epochs=head.epochs_run, best_epoch=head.best_epoch, stop_reason=head.stop_reason,
             train_accuracy=train_metrics["accuracy"], val_accuracy=val_metrics["accuracy"],
             warm_start=init is not None, seconds=round(phases["train"], 3))

    gate = quality_gate(previous, baseline, labels, x_val, y_val, val_metrics["accuracy"], job.quality_tolerance)
    log.info("quality_gate", **gate)
    summary = {
        "train_accuracy": train_metrics["accuracy"],
        "val_accuracy": val_metrics["accuracy"],
        "epochs": head.epochs_run,
        "best_epoch": head.best_epoch,
        "stop_reason": head.stop_reason,
    }
    metrics = {
        "run_id": run_id,
        "project": job.name,
        "reason": reason,
        "labels": labels,
        "counts": {"train": int(len(y_train)), "val": int(len(y_val)), "embedded": len(report.embedded),
                   "cached": report.cached, "skipped": len(report.skipped)},
        "per_label_counts": {label: int((y_train == i).sum()) for i, label in enumerate(labels)},
        "train": train_metrics,
        "validation": val_metrics,
        "training": {**summary, "warm_start": init is not None, "settings": asdict(job.head),
                     "history": head.history},
        "quality_gate": gate,
        "skipped_files": report.skipped,
    }
    if not gate["publish"]:
        phases["total"] = time.perf_counter() - t0
        metrics["phases_seconds"] = _rounded(phases)
        path = _write_metrics(job, run_id, metrics)
        log.warning("not_published", reason=gate["decision"], metrics_file=str(path))
        return RunResult("rejected", previous, metrics, path, report.embedded, report.skipped)

    version = publisher.next_version()
    manifest = {
        "name": job.name,
        "version": version,
        "labels": labels,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "reason": reason,
        "metrics": summary,
        "n_train": int(len(y_train)),
        "n_val": int(len(y_val)),
        "weights_sha256": w.sha256,
        "dataset_fingerprint": data_fp,
        "precision": job.export.precision,
        "weight_bits": job.export.weight_bits,
        "minimum_deployment_target": job.export.minimum_target,
        "watchtrain_version": service.__version__,
    }
    final = weights.with_head(model, mx.array(head.weight), mx.array(head.bias))
    staged = publisher.staging()
    try:
        mark = time.perf_counter()
        package = export.export(final, labels, staged / f"{job.name}.mlpackage", _export_options(job.export, manifest))
        weights.save_model(final, staged / MLX_WEIGHTS, {"labels": "\n".join(labels), "version": str(version)})
        phases["export"] = time.perf_counter() - mark

        mark = time.perf_counter()
        check = verify_package(package, final, labels, val or train, job.verify_photos)
        phases["verify"] = time.perf_counter() - mark
        log.info("verified", **{k: v for k, v in check.as_dict().items() if k != "package"})
        if not check.ok:
            raise verify.VerificationError(
                f"{job.name} v{version}: exported package disagrees with MLX (max |dp| {check.max_abs_diff:.2e}, "
                f"tolerance {check.tolerance:.0e}, top-1 mismatches {check.mismatches})")
        manifest["verification"] = {k: v for k, v in check.as_dict().items() if k != "package"}

        mark = time.perf_counter()
        manifest = publisher.publish(staged, manifest)
        phases["publish"] = time.perf_counter() - mark
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already when published
    phases["total"] = time.perf_counter() - t0
    metrics.update(version=version, verification=manifest["verification"], phases_seconds=_rounded(phases))
    path = _write_metrics(job, run_id, metrics, publisher.version_dir(version))
    log.info("published", version=version, package=str(publisher.package), val_accuracy=summary["val_accuracy"],
             metrics_file=str(path), phases=metrics["phases_seconds"])
    return RunResult("published", manifest, metrics, path, report.embedded, report.skipped)


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in phases.items()}


def _published_head(publisher: Publisher, previous: dict | None,
                    weights_sha: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The published head when it sits on this run's backbone (so embeddings are comparable)."""
    if not previous or previous.get("weights_sha256") != weights_sha:
        return None
    try:
        tensors = mx.load(str(publisher.mlx_weights(previous["version"])))
    except (OSError, ValueError, RuntimeError):
        return None
    return np.array(tensors["classifier.weight"]), np.array(tensors["classifier.bias"])


def quality_gate(previous: dict | None, baseline: tuple[np.ndarray, np.ndarray] | None, labels: list[str],
                 x_val: np.ndarray, y_val: np.ndarray, new_accuracy: float | None,
                 tolerance: float) -> dict[str, Any]:
    """Publish unless the new head is worse than the published one on *this* validation set."""
    decision: dict[str, Any] = {"tolerance": tolerance, "new_val_accuracy": new_accuracy}
    if previous is None:
        return {**decision, "publish": True, "decision": "first_model"}
    if previous.get("labels") != labels:
        added = sorted(set(labels) - set(previous.get("labels", [])))
        removed = sorted(set(previous.get("labels", [])) - set(labels))
        return {**decision, "publish": True, "decision": "labels_changed", "labels_added": added,
                "labels_removed": removed}
    if baseline is None or not len(y_val) or new_accuracy is None:
        return {**decision, "publish": True, "decision": "no_comparable_baseline"}
    old = float((_predict(baseline[0], baseline[1], x_val) == y_val).mean())
    decision["published_val_accuracy"] = round(old, 6)
    decision["published_version"] = previous.get("version")
    if new_accuracy + tolerance < old:
        return {**decision, "publish": False, "decision": "worse_than_published"}
    return {**decision, "publish": True, "decision": "not_worse"}


def verify_package(package: Path, model, labels: list[str], photos: list[ds.Photo],
                   count: int) -> verify.Report:
    """Run the saved package (NumPy, and Core ML on macOS) against MLX on ``count`` photos."""
    chosen = _spread(photos, count)
    pixels = [load_rgb(p.path) for p in chosen]
    reference = probabilities_of_pixels(model, pixels)
    return verify.verify(package, reference, pixels, [p.relpath for p in chosen], labels)


def _spread(photos: list[ds.Photo], count: int) -> list[ds.Photo]:
    """Up to ``count`` photos, round-robin over labels, deterministic."""
    by_label: dict[str, list[ds.Photo]] = {}
    for p in sorted(photos, key=lambda p: p.relpath):
        by_label.setdefault(p.label, []).append(p)
    chosen: list[ds.Photo] = []
    for i in range(max((len(v) for v in by_label.values()), default=0)):
        chosen += [group[i] for group in by_label.values() if i < len(group)]
    return chosen[:count]


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
    return ExportOptions(**{**asdict(base), "version": str(manifest["version"]), "metadata": {**base.metadata, **meta}})


def _write_metrics(job: Job, run_id: str, metrics: dict, version_dir: Path | None = None) -> Path:
    path = job.state_dir / "runs" / job.name / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics)
    if version_dir is not None:
        write_json_atomic(version_dir / "metrics.json", metrics)
    return path
