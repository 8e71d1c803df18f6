"""One training run: files -> dataset -> embeddings -> head -> export -> verify -> gate -> publish.

The daemon and the one-shot CLI both call :func:`run`. A run that fails, is
stopped, or is refused by the quality gate leaves the published model untouched;
every run that gets as far as training writes a metrics JSON file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
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
from service import evaluation, export, finetune, native, verify, weights
from service.embeddings import Cancelled, EmbeddingCache, embed
from service.export import ExportOptions
from service.images import load_rgb
from service.predict import probabilities_of_pixels
from service.publish import MLX_WEIGHTS, Publisher, write_json_atomic

DATASET_INDEX = "dataset.json"
from service.finetune import FinetuneSettings
from service.training import HeadResult, HeadSettings, train_head
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
    settle_seconds: float = 0.0  # photos modified more recently are left for the next run (daemon: 2)
    head: HeadSettings = HeadSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    export: ExportOptions = ExportOptions()


@dataclass
class RunResult:
    status: str  # "published" | "unchanged" | "rejected" | "deferred"
    manifest: dict[str, Any] | None
    metrics: dict[str, Any]
    metrics_path: Path | None
    embedded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None  # seconds; set when the run was deferred (photos still being written)


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
    mode: str = "incremental",
) -> RunResult:
    """Train and publish ``job``.

    ``mode="incremental"`` trains the head on cached embeddings, warm-started from
    the published head; ``mode="nightly"`` deep fine-tunes the last blocks (see
    :mod:`service.finetune`). ``force=False`` skips a run whose data is unchanged.
    """
    if mode not in ("incremental", "nightly"):
        raise ValueError(f"unknown mode {mode!r}")
    service.cpu.use_buffer_cache()
    run_id = dt.datetime.now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    log = log.bind(project=job.name, run_id=run_id)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    publisher = Publisher(job.output, job.name, job.keep_versions)
    if removed := publisher.clean_tmp():
        log.info("removed_stale_staging", count=removed)
    if recovered := publisher.recover():
        log.info("finished_interrupted_publish", version=recovered["version"])
    previous = publisher.current()

    mark = time.perf_counter()
    pretrained = weights.resolve(job.weights, job.weights_url, log=log)
    model, w = weights.load(backbone_for(previous, pretrained, mode == "nightly" and job.finetune.from_imagenet))
    native.kernel()  # built on a machine's first run; loaded now so run_started can say which path runs
    phases["load_weights"] = time.perf_counter() - mark

    mark = time.perf_counter()
    train, val = scan(job)
    fresh = ds.unsettled(train + val, job.settle_seconds, time.time_ns())
    if fresh:
        # Part of the data is still being written (a copy in progress, a sync, a restore): train on
        # none of it yet. A model of the settled part alone could lack a whole label.
        log.info("photos_not_settled", count=len(fresh), files=sorted(str(p.path) for p in fresh)[:50],
                 retry_in_seconds=job.settle_seconds, decision="run_deferred")
        return RunResult("deferred", previous, {}, None, retry_after=job.settle_seconds)
    phases["scan"] = time.perf_counter() - mark
    log.info("run_started", reason=reason, mode=mode, n_train_files=len(train), n_val_files=len(val),
             weights=str(w.path), weights_layout=w.layout, blas=service.cpu.loaded, native_kernel=native.status)

    mark = time.perf_counter()
    cache = EmbeddingCache(job.state_dir / "embeddings.sqlite")
    try:
        vectors, hashes, report = embed(
            model, w.sha256, train + val, cache, should_stop=should_stop,
            on_skip=lambda photo, why: log.warning("photo_skipped", file=str(photo.path), reason=why),
            on_progress=_progress_logger(log),
        )
        phases["embed"] = time.perf_counter() - mark
        log.info("embedded", count=len(report.embedded), cached=report.cached, skipped=len(report.skipped),
                 files=report.embedded[:50], seconds=round(report.seconds, 3))

        found = set(ds.labels_of(train))
        train = [p for p in train if str(p.path) in vectors]
        val = [p for p in val if str(p.path) in vectors]
        labels = list(ds.labels_of(train))
        if empty := sorted(found - set(labels)):
            log.warning("labels_without_usable_photos", labels=empty, folder=str(job.dataset))
        ds.check_labels(tuple(labels), job.dataset)
        if dropped := sorted({p.label for p in val} - set(labels)):
            log.warning("validation_labels_without_training_photos", labels=dropped)
        train = [p for p in train if p.label in labels]
        val = [p for p in val if p.label in labels]
        data_fp = fingerprint(train, val, hashes)
        if not force and previous and previous.get("dataset_fingerprint") == data_fp \
                and previous.get("weights_sha256") == w.sha256:
            log.info("run_skipped_unchanged", version=previous["version"])
            return RunResult("unchanged", previous, {}, None, report.embedded, report.skipped)
        changes = dataset_changes(publisher, previous, train, val, hashes)
        log.info("dataset_changes", **{k: len(v) for k, v in changes.items()})

        x_train, y_train = matrix(vectors, train, labels)
        x_val, y_val = matrix(vectors, val, labels)
        old_accuracy = published_accuracy(publisher, previous, val, labels, cache, log)
        prev_head = _published_head(publisher, previous, w.sha256)
        init = warm_start_head(prev_head, previous, labels, x_train, y_train) if prev_head is not None else None

        mark = time.perf_counter()
        if mode == "nightly":
            # Start the head from the published one (same backbone and labels) or a linear
            # probe: a random head needs many more steps and fails on small datasets.
            if init is None:
                quick = train_head(x_train, y_train, x_val, y_val, len(labels), job.head, should_stop=should_stop)
                init = (quick.weight, quick.bias)
            deep = finetune.nightly(model, w.sha256, train, val, hashes, y_train, y_val, labels, init, job.finetune,
                                    job.state_dir, job.name, data_fp, log, should_stop)
            train = [train[i] for i in deep.kept_train]
            val = [val[i] for i in deep.kept_val]
            y_train, y_val = y_train[deep.kept_train], y_val[deep.kept_val]
            x_train, x_val = deep.x_train, deep.x_val
            model, w = weights.load(deep.backbone)
            cache.put_many([(hashes[str(p.path)], v) for p, v in zip(train + val, np.concatenate([x_train, x_val]))],
                           w.sha256)
            data_fp = fingerprint(train, val, hashes)
            r = deep.result
            head = HeadResult(deep.weight, deep.bias, r.epochs_run, r.best_epoch, r.stop_reason, r.history)
            training_info = {"mode": "nightly", "settings": _jsonable(job.finetune), "front_features_computed":
                             deep.front_computed, "resumed_from_epoch": r.resumed_from_epoch,
                             "backbone": str(deep.backbone)}
        else:
            head = train_head(x_train, y_train, x_val, y_val, len(labels), job.head, init=init,
                              should_stop=should_stop)
            training_info = {"mode": "incremental", "settings": asdict(job.head), "warm_start": init is not None}
        phases["train"] = time.perf_counter() - mark
    finally:
        cache.close()
    train_metrics = evaluation.metrics(y_train, _predict(head.weight, head.bias, x_train), labels)
    val_metrics = evaluation.metrics(y_val, _predict(head.weight, head.bias, x_val), labels)
    log.info("trained", mode=mode, epochs=head.epochs_run, best_epoch=head.best_epoch, stop_reason=head.stop_reason,
             train_accuracy=train_metrics["accuracy"], val_accuracy=val_metrics["accuracy"],
             warm_start=init is not None, seconds=round(phases["train"], 3))

    gate = quality_gate(previous, old_accuracy, labels, val_metrics["accuracy"], job.quality_tolerance)
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
        "mode": mode,
        "labels": labels,
        "counts": {"train": int(len(y_train)), "val": int(len(y_val)), "embedded": len(report.embedded),
                   "cached": report.cached, "skipped": len(report.skipped)},
        "per_label_counts": {label: int((y_train == i).sum()) for i, label in enumerate(labels)},
        "dataset_changes": changes,
        "train": train_metrics,
        "validation": val_metrics,
        "training": {**summary, **training_info, "history": head.history},
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
        "mode": mode,
        "metrics": summary,
        "n_train": int(len(y_train)),
        "n_val": int(len(y_val)),
        "weights_sha256": w.sha256,
        "backbone": str(w.path),
        "pretrained_sha256": weights.sha256_file(pretrained),
        "dataset_fingerprint": data_fp,
        "precision": job.export.precision,
        "weight_bits": job.export.weight_bits,
        "minimum_deployment_target": job.export.minimum_target,
        "watchtrain_version": service.__version__,
    }
    if should_stop():  # stopping: a finished training is not worth a late export
        raise Cancelled()
    final = weights.with_head(model, mx.array(head.weight), mx.array(head.bias))
    staged = publisher.staging()
    try:
        mark = time.perf_counter()
        package = export.export(final, labels, staged / f"{job.name}.mlpackage", _export_options(job.export, manifest))
        weights.save_model(final, staged / MLX_WEIGHTS, {"labels": "\n".join(labels), "version": str(version)})
        write_json_atomic(staged / DATASET_INDEX, dataset_index(train, val, hashes))
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

        if should_stop():
            raise Cancelled()
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


def backbone_for(previous: dict | None, pretrained: Path, from_pretrained: bool) -> Path:
    """The backbone a run starts from: the published model's fine-tuned one (kept by every
    incremental run after a nightly one), else the configured pretrained weights."""
    if previous and not from_pretrained:
        path = Path(previous.get("backbone", ""))
        fine_tuned = previous.get("weights_sha256") != previous.get("pretrained_sha256")
        if fine_tuned and path.is_file():
            return path
    return pretrained


def dataset_index(train: list[ds.Photo], val: list[ds.Photo], hashes: dict[str, str]) -> list[list[str]]:
    """[relpath, label, sha256, side] of every photo a model was trained and validated on."""
    return [[p.relpath, p.label, hashes[str(p.path)], side] for side, photos in (("train", train), ("val", val))
            for p in photos]


def dataset_changes(publisher: Publisher, previous: dict | None, train: list[ds.Photo], val: list[ds.Photo],
                    hashes: dict[str, str]) -> dict[str, list[str]]:
    """What changed since the published model: added, removed, modified and relabeled photos.

    A photo whose bytes moved to another label folder is *relabeled* (and not re-embedded).
    """
    try:
        old_rows = json.loads((publisher.version_dir(previous["version"]) / DATASET_INDEX).read_text())
    except (TypeError, KeyError, OSError, ValueError):
        old_rows = []
    old = {(row[3], row[0]): (row[1], row[2]) for row in old_rows}
    old_by_sha = {(row[3], row[2]): row[1] for row in old_rows}
    new = {(side, p.relpath): (p.label, hashes[str(p.path)]) for side, photos in (("train", train), ("val", val))
           for p in photos}
    out: dict[str, list[str]] = {"added": [], "removed": [], "modified": [], "relabeled": []}
    new_shas = {(side, sha) for (side, _), (_, sha) in new.items()}
    for key, (label, sha) in new.items():
        if key in old:
            if old[key][1] != sha:
                out["modified"].append(key[1])
        elif (key[0], sha) in old_by_sha:
            if old_by_sha[(key[0], sha)] != label:
                out["relabeled"].append(key[1])
        else:
            out["added"].append(key[1])
    for key, (label, sha) in old.items():
        if key not in new and (key[0], sha) not in new_shas:
            out["removed"].append(key[1])
    return out


def warm_start_head(prev: tuple[np.ndarray, np.ndarray], previous: dict, labels: list[str], x_train: np.ndarray,
                    y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The published head re-indexed to ``labels``: kept labels keep their rows, removed
    labels drop theirs, a new label's row is imprinted from its photos' mean embedding."""
    prev_labels = list(previous["labels"])
    weight = np.zeros((len(labels), prev[0].shape[1]), np.float32)
    bias = np.zeros(len(labels), np.float32)
    norm = float(np.linalg.norm(prev[0], axis=1).mean())
    for i, label in enumerate(labels):
        if label in prev_labels:
            j = prev_labels.index(label)
            weight[i], bias[i] = prev[0][j], prev[1][j]
        else:
            mean = x_train[y_train == i].mean(axis=0) - x_train.mean(axis=0)
            weight[i] = mean / (np.linalg.norm(mean) + 1e-8) * norm
            bias[i] = float(prev[1].mean())
    return weight, bias


def _jsonable(settings: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(settings), default=str))


def _progress_logger(log: Any, every_seconds: float = 30.0) -> Callable[[int, int], None]:
    """Log embedding progress at most every ``every_seconds`` (a first run takes minutes)."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= every_seconds or done == total:
            last[0] = time.monotonic()
            log.info("embedding_progress", done=done, total=total)

    return report


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


def published_accuracy(publisher: Publisher, previous: dict | None, val: list[ds.Photo], labels: list[str],
                       cache: EmbeddingCache, log: Any) -> float | None:
    """The published model's accuracy on *this* validation set (None when not comparable).

    Its embeddings come from the cache under its own backbone's fingerprint, so this
    is free unless the backbone changed since (then the validation photos are embedded
    once with the published model).
    """
    if not previous or previous.get("labels") != labels or not val:
        return None
    try:
        model, _ = weights.load(publisher.mlx_weights(previous["version"]))
    except (OSError, weights.WeightsError):
        return None
    vectors, _, _ = embed(model, previous["weights_sha256"], val, cache)
    x, y = matrix(vectors, val, labels)
    if not len(y):
        return None
    return float((_predict(np.array(model.classifier.weight), np.array(model.classifier.bias), x) == y).mean())


def quality_gate(previous: dict | None, old_accuracy: float | None, labels: list[str],
                 new_accuracy: float | None, tolerance: float) -> dict[str, Any]:
    """Publish unless the new model is worse than the published one on *this* validation set."""
    decision: dict[str, Any] = {"tolerance": tolerance, "new_val_accuracy": new_accuracy}
    if previous is None:
        return {**decision, "publish": True, "decision": "first_model"}
    if previous.get("labels") != labels:
        added = sorted(set(labels) - set(previous.get("labels", [])))
        removed = sorted(set(previous.get("labels", [])) - set(labels))
        return {**decision, "publish": True, "decision": "labels_changed", "labels_added": added,
                "labels_removed": removed}
    if old_accuracy is None or new_accuracy is None:
        return {**decision, "publish": True, "decision": "no_comparable_baseline"}
    decision["published_val_accuracy"] = round(old_accuracy, 6)
    decision["published_version"] = previous.get("version")
    if new_accuracy + tolerance < old_accuracy:
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
