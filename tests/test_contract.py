"""The publishing contract seen from outside: concurrent readers, crashes, the quality gate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from service import export, pipeline, weights
from service.publish import Publisher, tree_sha256
from tests.conftest import ROOT, SAMPLES, events_named

READER = r"""
import hashlib, json, os, sys, time
package, seconds, allowed = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
end, reads, seen = time.monotonic() + seconds, 0, set()
while time.monotonic() < end:
    # A reader that opens the package once and reads inside it (as a copy or compile does).
    fd = os.open(package, os.O_RDONLY | os.O_DIRECTORY)
    try:
        files = {}
        for rel in sorted(allowed[0]):
            f = os.open(rel, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(f, "rb") as fh:
                files[rel] = hashlib.sha256(fh.read()).hexdigest()
    finally:
        os.close(fd)
    match = [i for i, version in enumerate(allowed) if version == files]
    if not match:
        print("MIXED", files, flush=True)
        sys.exit(1)
    seen.add(match[0])
    reads += 1
print(json.dumps({"reads": reads, "seen": sorted(seen)}))
"""


@pytest.fixture(scope="module")
def two_packages(tmp_path_factory, weights_path) -> list[Path]:
    """Two real, different exports of the ImageNet model (FP16 and FP32)."""
    model, _ = weights.load(weights_path)
    labels = (SAMPLES / "imagenet_labels.txt").read_text().splitlines()
    root = tmp_path_factory.mktemp("pkgs")
    return [export.export(model, labels, root / f"{p}" / "M.mlpackage", export.ExportOptions(precision=p))
            for p in ("float16", "float32")]


def test_concurrent_reader_sees_whole_versions(two_packages, tmp_path):
    pub = Publisher(tmp_path, "M")
    hashes = [tree_sha256(p) for p in two_packages]
    staged = pub.staging()
    shutil.copytree(two_packages[0], staged / "M.mlpackage")
    pub.publish(staged, {"version": pub.next_version()})
    reader = subprocess.Popen([sys.executable, "-c", READER, str(pub.package), "6", json.dumps(hashes)],
                              stdout=subprocess.PIPE, text=True)
    published = 0
    while reader.poll() is None:
        staged = pub.staging()
        shutil.copytree(two_packages[(published + 1) % 2], staged / "M.mlpackage")
        pub.publish(staged, {"version": pub.next_version()})
        published += 1
    out = reader.communicate()[0]
    assert reader.returncode == 0, out
    result = json.loads(out)
    assert published >= 5 and result["reads"] >= 5
    assert result["seen"] == [0, 1]  # it really read both versions while they were swapped


def test_sigkill_during_export_leaves_no_temporary_folder(subset, weights_path, warm_embeddings, tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    shutil.copy2(warm_embeddings, state / "embeddings.sqlite")
    args = [sys.executable, "-m", "daemon", "train", str(subset["train"]), "--validation", str(subset["val"]),
            "--output", str(out), "--name", "S", "--weights", str(weights_path), "--state-dir", str(state)]
    assert subprocess.run(args, capture_output=True, cwd=ROOT, timeout=600).returncode == 0
    before = json.loads((out / "S.json").read_text())

    log = tmp_path / "log"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    staging = out / ".watchtrain" / "tmp"
    deadline = time.monotonic() + 300
    while not any(staging.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the export is being written into staging
    proc.wait()
    assert any(staging.iterdir()), log.read_text()[-2000:]  # the crash did leave a half-written export
    assert json.loads((out / "S.json").read_text()) == before  # published model untouched
    assert (out / "S.mlpackage" / "Manifest.json").is_file()

    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list((out / ".watchtrain" / "tmp").iterdir()) == []
    assert json.loads((out / "S.json").read_text())["version"] > before["version"]


def test_quality_gate_refuses_a_worse_model(subset, job_for, captured, weights_path, tmp_path):
    """Switching to worse weights (the real ones run with the wrong padding) and a barely
    trained head gives a worse model: it is refused and the published one stays."""
    import mlx.core as mx
    from service.training import HeadSettings

    job = job_for(subset)
    first = pipeline.run(job, log=structlog.get_logger())
    tensors, meta = mx.load(str(weights_path), return_metadata=True)
    worse = tmp_path / "symmetric.safetensors"
    mx.save_safetensors(str(worse), tensors, metadata={**meta, "padding": "symmetric", "normalization": "imagenet"})
    bad = job_for(subset, weights=worse, head=HeadSettings(epochs=1, learning_rate=1e-7, patience=1))
    result = pipeline.run(bad, log=structlog.get_logger())
    assert result.status == "rejected"
    gate = result.metrics["quality_gate"]
    assert gate["decision"] == "worse_than_published" and gate["publish"] is False
    assert gate["published_val_accuracy"] == first.manifest["metrics"]["val_accuracy"]
    assert gate["new_val_accuracy"] < gate["published_val_accuracy"] - gate["tolerance"]
    assert json.loads(result.metrics_path.read_text())["quality_gate"] == gate
    assert Publisher(job.output, job.name).current()["version"] == 1
    assert events_named(captured, "not_published")


def test_quality_gate_reports_label_changes(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=structlog.get_logger())
    shutil.copytree(subset["train"] / "hat", subset["train"] / "cap")
    result = pipeline.run(job, log=structlog.get_logger())
    gate = result.metrics["quality_gate"]
    assert result.status == "published" and gate["decision"] == "labels_changed"
    assert gate["labels_added"] == ["cap"] and gate["labels_removed"] == []


def test_published_manifest_and_package_agree(subset, job_for, captured):
    job = job_for(subset)
    manifest = pipeline.run(job, log=structlog.get_logger()).manifest
    assert manifest["package_sha256"] == tree_sha256(job.output / "Subset.mlpackage")
    assert manifest["verification"]["ok"] is True and manifest["verification"]["n"] == 15
    from service.verify import package_version

    assert package_version(job.output / "Subset.mlpackage") == manifest["version"]


def test_verify_cli(subset, job_for, captured):
    job = job_for(subset)
    pipeline.run(job, log=structlog.get_logger())
    done = subprocess.run([sys.executable, "-m", "daemon", "verify", str(job.output / "Subset.mlpackage"),
                           "--images", str(subset["val"]), "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["n"] == 15 and report["top1_agreement"] == 1.0
    # A damaged package or something that is not a package: a clear error naming it, no traceback.
    broken = subset["root"] / "broken" / "Subset.mlpackage"
    shutil.copytree(job.output / "Subset.mlpackage", broken)
    (broken / "Data" / "com.apple.CoreML" / "model.mlmodel").write_text("garbage")
    for target in (broken, subset["train"]):
        done = subprocess.run([sys.executable, "-m", "daemon", "verify", str(target), "--images", str(subset["val"])],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert str(target) in done.stderr and ("unreadable model spec" in done.stderr or "not an .mlpackage" in done.stderr)
