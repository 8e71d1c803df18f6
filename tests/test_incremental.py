"""Incremental and nightly runs on real photos: new, removed and relabeled labels, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import structlog

from service import pipeline, weights
from service.augment import AugmentSettings
from service.embeddings import Cancelled
from service.finetune import FinetuneSettings
from service.publish import Publisher
from tests.conftest import ROOT, clothing_photos, events_named

log = structlog.get_logger()
FAST_NIGHTLY = FinetuneSettings(epochs=4, patience=4, augment=AugmentSettings(views=2))


def _add_label(subset, label: str, n_train: int = 15, n_val: int = 5) -> None:
    for split, root, n in (("train", subset["train"], n_train), ("validation", subset["val"], n_val)):
        (root / label).mkdir()
        for photo in clothing_photos(split, label)[:n]:
            shutil.copy2(photo, root / label / photo.name)


def test_new_label_gets_an_imprinted_row(subset, job_for, captured):
    job = job_for(subset)
    first = pipeline.run(job, log=log)
    _add_label(subset, "skirt")
    result = pipeline.run(job, log=log, force=False)
    assert result.manifest["labels"] == ["hat", "pants", "shoes", "skirt"]
    assert result.metrics["quality_gate"]["decision"] == "labels_changed"
    assert result.metrics["quality_gate"]["labels_added"] == ["skirt"]
    assert result.metrics["training"]["warm_start"] is True
    assert len(result.metrics["dataset_changes"]["added"]) == 20
    assert result.metrics["validation"]["per_label"]["skirt"]["recall"] >= 0.6
    assert sorted(len(v) for v in result.metrics["validation"]["confusion_matrix"]["rows_true_cols_predicted"]) == [4] * 4
    assert first.manifest["version"] + 1 == result.manifest["version"]


def test_imprinting_keeps_known_rows_and_points_new_rows_at_their_photos(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    published = Publisher(job.output, job.name)
    tensors = weights.load(published.mlx_weights())[0]
    prev = (np.array(tensors.classifier.weight), np.array(tensors.classifier.bias))
    rng = np.random.default_rng(0)
    x = rng.random((30, 1280), dtype=np.float32)
    x[20:] += 2.0 * (np.arange(1280) % 7 == 0)  # the new label's photos share a direction
    w, b = pipeline.warm_start_head(prev, published.current(), ["hat", "new", "shoes"], x, np.array(
        [0] * 10 + [2] * 10 + [1] * 10))
    np.testing.assert_array_equal(w[0], prev[0][0])  # hat kept
    np.testing.assert_array_equal(w[2], prev[0][2])  # shoes kept; pants dropped
    assert abs(np.linalg.norm(w[1]) - np.linalg.norm(prev[0], axis=1).mean()) < 1e-3
    assert np.corrcoef(w[1], x[20:].mean(0) - x.mean(0))[0, 1] > 0.99


def test_removed_label_drops_its_row(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    shutil.rmtree(subset["train"] / "pants")
    shutil.rmtree(subset["val"] / "pants")
    result = pipeline.run(job, log=log, force=False)
    assert result.manifest["labels"] == ["hat", "shoes"]
    assert result.metrics["quality_gate"]["labels_removed"] == ["pants"]
    assert result.metrics["training"]["warm_start"] is True
    assert len(result.metrics["dataset_changes"]["removed"]) == 20
    assert weights.load(Publisher(job.output, job.name).mlx_weights())[0].classifier.weight.shape == (2, 1280)


def test_moved_photo_is_relabeled_not_new(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    moved = next(iter(sorted((subset["train"] / "hat").iterdir())))
    shutil.move(moved, subset["train"] / "shoes" / moved.name)
    result = pipeline.run(job, log=log, force=False)
    changes = result.metrics["dataset_changes"]
    assert changes["relabeled"] == [f"shoes/{moved.name}"]
    assert changes["added"] == [] and changes["removed"] == []
    assert result.embedded == []  # same bytes: not embedded again
    assert result.metrics["per_label_counts"] == {"hat": 14, "pants": 15, "shoes": 16}


def test_nightly_then_incremental_embeds_only_new_photos(subset, job_for, captured):
    job = job_for(subset, finetune=FAST_NIGHTLY)
    first = pipeline.run(job, log=log)
    nightly = pipeline.run(job, log=log, reason="schedule", mode="nightly")
    assert nightly.status == "published" and nightly.manifest["mode"] == "nightly"
    assert nightly.manifest["weights_sha256"] != first.manifest["weights_sha256"]
    assert nightly.manifest["pretrained_sha256"] == first.manifest["weights_sha256"]
    assert nightly.metrics["training"]["front_features_computed"] == 45 * 2 + 15
    assert nightly.manifest["verification"]["ok"]
    assert len(events_named(captured, "finetune_epoch")) >= 1

    for photo in subset["extra"].iterdir():
        shutil.copy2(photo, subset["train"] / "hat" / photo.name)
    after = pipeline.run(job, log=log, reason="change", force=False)
    assert after.status == "published"
    assert len(after.embedded) == 5  # the nightly run stored embeddings under its new backbone
    assert after.manifest["weights_sha256"] == nightly.manifest["weights_sha256"]
    assert after.metrics["training"]["warm_start"] is True
    assert after.manifest["metrics"]["val_accuracy"] >= nightly.manifest["metrics"]["val_accuracy"] - 0.01

    next(iter((subset["train"] / "pants").iterdir())).unlink()
    later = pipeline.run(job, log=log, reason="change", force=False)
    assert later.manifest["weights_sha256"] == nightly.manifest["weights_sha256"]  # still the fine-tuned backbone
    assert later.embedded == [] and later.metrics["training"]["warm_start"] is True

    # The next night continues from this backbone; its frozen front is unchanged, so only
    # the 5 new photos (2 views each) go through it.
    again = pipeline.run(job, log=log, reason="schedule", mode="nightly")
    assert again.metrics["training"]["front_features_computed"] == 5 * 2
    assert again.status in ("published", "rejected")
    assert again.metrics["training"]["backbone"] != nightly.manifest["backbone"]


def test_nightly_resumes_after_interruption(subset, job_for, captured):
    job = job_for(subset, finetune=FinetuneSettings(epochs=6, patience=6, augment=AugmentSettings(views=2)))
    pipeline.run(job, log=log)
    checkpoint = job.state_dir / "checkpoints" / job.name / "checkpoint.json"

    def stop_after_two_epochs() -> bool:
        return checkpoint.exists() and json.loads(checkpoint.read_text())["epoch"] >= 2

    with pytest.raises(Cancelled):
        pipeline.run(job, log=log, reason="schedule", mode="nightly", should_stop=stop_after_two_epochs)
    assert Publisher(job.output, job.name).current()["version"] == 1  # nothing published
    assert json.loads(checkpoint.read_text())["epoch"] == 2
    captured.clear()
    result = pipeline.run(job, log=log, reason="resume", mode="nightly")
    assert events_named(captured, "finetune_resumed")[0]["from_epoch"] == 2
    assert result.metrics["training"]["resumed_from_epoch"] == 2
    assert [h["epoch"] for h in result.metrics["training"]["history"]] == list(range(1, result.metrics["training"]["epochs"] + 1))
    assert events_named(captured, "front_features")[0]["computed"] == 0  # cached by the interrupted run
    assert not checkpoint.exists()  # a finished run leaves no checkpoint to resume


def test_evaluate_cli(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    done = subprocess.run([sys.executable, "-m", "daemon", "evaluate", str(job.output / "Subset.mlpackage"),
                           "--images", str(subset["val"]), "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n"] == 15 and set(result["per_label"]) == {"hat", "pants", "shoes"}
    assert result["accuracy"] >= 0.8 and result["version"] == 1
