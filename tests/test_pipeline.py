"""Whole training runs on real photos: embed, train, export, publish."""

from __future__ import annotations

import json
import shutil

import pytest
import structlog

from service import pipeline
from service.dataset import DatasetError
from service.embeddings import Cancelled
from service.publish import Publisher
from tests.conftest import events_named

log = structlog.get_logger()


def test_first_run_publishes_a_model(subset, job_for, captured):
    job = job_for(subset)
    result = pipeline.run(job, log=log)
    assert result.status == "published"
    manifest = json.loads((job.output / "Subset.json").read_text())
    assert manifest["version"] == 1
    assert manifest["labels"] == ["hat", "pants", "shoes"]
    assert (manifest["n_train"], manifest["n_val"]) == (45, 15)
    assert manifest["metrics"]["val_accuracy"] >= 0.8
    assert manifest["weights_sha256"] == "baffa95ad5122c3bc0f6ae5a2bad666cd9f87df5b6f25468b64aab57708a921f"
    for key in ("trained_at", "dataset_fingerprint", "package_sha256"):
        assert manifest[key]
    assert (job.output / "Subset.mlpackage" / "Manifest.json").is_file()
    metrics = json.loads(result.metrics_path.read_text())
    assert set(metrics["validation"]["per_label"]) == {"hat", "pants", "shoes"}
    assert len(metrics["validation"]["confusion_matrix"]["rows_true_cols_predicted"]) == 3
    assert metrics["counts"] == {"train": 45, "val": 15, "embedded": 0, "cached": 60, "skipped": 0}
    assert set(metrics["phases_seconds"]) >= {"scan", "embed", "train", "export", "publish", "total"}
    assert events_named(captured, "published")[0]["version"] == 1


def test_added_photos_are_the_only_ones_embedded(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    for photo in subset["extra"].iterdir():
        shutil.copy2(photo, subset["train"] / "hat" / photo.name)
    result = pipeline.run(job, log=log, reason="change", force=False)
    assert result.status == "published" and result.manifest["version"] == 2
    assert sorted(p.rsplit("/", 1)[1] for p in result.embedded) == sorted(p.name for p in subset["extra"].iterdir())
    assert result.metrics["training"]["warm_start"] is True
    assert result.manifest["n_train"] == 50


def test_unchanged_dataset_is_not_retrained_unless_forced(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    assert pipeline.run(job, log=log, force=False).status == "unchanged"
    assert pipeline.run(job, log=log, force=True).manifest["version"] == 2


def test_unreadable_photo_is_skipped_with_a_warning_naming_it(subset, job_for, captured):
    broken = subset["train"] / "shoes" / "broken.jpg"
    broken.write_text("not a photo")
    result = pipeline.run(job_for(subset), log=log)
    assert result.status == "published" and result.manifest["n_train"] == 45
    warnings = events_named(captured, "photo_skipped")
    assert [w["file"] for w in warnings] == [str(broken)]
    assert "broken.jpg" in warnings[0]["reason"]
    assert str(broken) in result.metrics["skipped_files"]


def test_a_bad_dataset_keeps_the_published_model(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=log)
    before = Publisher(job.output, job.name).current()
    shutil.rmtree(subset["train"] / "pants")
    shutil.rmtree(subset["train"] / "shoes")
    with pytest.raises(DatasetError, match="at least two label folders"):
        pipeline.run(job, log=log)
    assert Publisher(job.output, job.name).current() == before
    assert (job.output / "Subset.mlpackage" / "Manifest.json").is_file()


def test_validation_split_without_a_validation_folder(subset, job_for, captured):
    result = pipeline.run(job_for(subset, validation=None, validation_fraction=0.2), log=log)
    assert result.manifest["n_train"] + result.manifest["n_val"] == 45
    assert result.manifest["n_val"] > 0


def test_stop_request_cancels_without_publishing(subset, job_for, captured):
    job = job_for(subset, warm=False)
    with pytest.raises(Cancelled):
        pipeline.run(job, log=log, should_stop=lambda: True)
    assert Publisher(job.output, job.name).current() is None
    assert not (job.output / "Subset.mlpackage").exists()


def test_photos_still_being_written_wait_for_the_next_run(subset, job_for, captured):
    import os
    import time

    job = job_for(subset, settle_seconds=30.0)
    old = time.time() - 3600
    for photo in subset["train"].rglob("*.jpg"):
        os.utime(photo, (old, old))
    for photo in subset["val"].rglob("*.jpg"):
        os.utime(photo, (old, old))
    incoming = subset["train"] / "hat" / "incoming.jpg"
    shutil.copyfile(next(subset["extra"].iterdir()), incoming)  # mtime: now, as while copying
    result = pipeline.run(job, log=log)
    # Nothing is trained on a partial copy: the run waits for every photo to settle.
    assert result.status == "deferred" and result.manifest is None and result.retry_after == 30.0
    assert events_named(captured, "photos_not_settled")[0]["files"] == [str(incoming)]
    assert not (job.output / "Subset.mlpackage").exists()
    os.utime(incoming, (old, old))  # the copy finished a while ago
    result = pipeline.run(job, log=log, force=False)
    assert result.status == "published" and result.manifest["n_train"] == 46 and result.retry_after is None


def test_a_label_folder_copied_just_now_is_not_left_out(subset, job_for):
    import os
    import time

    job = job_for(subset, settle_seconds=30.0)
    old = time.time() - 3600
    for photo in [*subset["train"].rglob("*.jpg"), *subset["val"].rglob("*.jpg")]:
        os.utime(photo, (old, old))
    for photo in (subset["train"] / "shoes").iterdir():  # `cp` without -p, a restore, a sync
        os.utime(photo, None)
    result = pipeline.run(job, log=log)
    assert result.status == "deferred"  # not a model without "shoes"
    for photo in (subset["train"] / "shoes").iterdir():
        os.utime(photo, (old, old))
    result = pipeline.run(job, log=log)
    assert result.manifest["labels"] == ["hat", "pants", "shoes"]
