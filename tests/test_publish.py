"""Publishing: atomic exchange, versions, history retention, no staging left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

from service.publish import Publisher, exchange, tree_sha256


def _stage(pub: Publisher, marker: str) -> Path:
    staged = pub.staging()
    package = staged / f"{pub.name}.mlpackage"
    (package / "Data").mkdir(parents=True)
    (package / "Manifest.json").write_text(marker)
    (package / "Data" / "weights.bin").write_bytes(marker.encode() * 1000)
    (staged / "model.safetensors").write_bytes(b"w")
    return staged


def test_exchange_swaps_directories_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert exchange(a, b)  # Linux renameat2 / macOS renamex_np
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_versions_history_and_retention(tmp_path):
    pub = Publisher(tmp_path, "M", keep_versions=2)
    for i in range(1, 5):
        version = pub.next_version()
        assert version == i
        manifest = pub.publish(_stage(pub, f"v{i}"), {"version": version, "labels": ["a", "b"]})
        assert (pub.package / "Manifest.json").read_text() == f"v{i}"
        assert pub.current()["version"] == i
        assert manifest["package_sha256"] == tree_sha256(pub.package)
    assert sorted(p.name for p in pub.versions.iterdir()) == ["v000003", "v000004"]
    assert (pub.version_dir(4) / "M.mlpackage" / "Manifest.json").read_text() == "v4"
    assert pub.mlx_weights() == pub.version_dir(4) / "model.safetensors"
    # staging is cleaned as it goes: nothing left in tmp
    assert list(pub.tmp.iterdir()) == []
    assert sorted(os.listdir(tmp_path)) == [".watchtrain", "M.json", "M.mlpackage"]


def test_stale_staging_from_a_crash_is_removed(tmp_path):
    pub = Publisher(tmp_path, "M")
    _stage(pub, "half-written")
    other = Publisher(tmp_path, "Other")
    _stage(other, "someone else's")
    assert pub.clean_tmp() == 1
    assert [p.name.split("-")[0] for p in pub.tmp.iterdir()] == ["Other"]


def test_published_files_are_world_readable(tmp_path):
    pub = Publisher(tmp_path, "M")
    staged = _stage(pub, "v1")
    os.chmod(staged / "M.mlpackage" / "Manifest.json", 0o600)
    pub.publish(staged, {"version": 1})
    assert (pub.package / "Manifest.json").stat().st_mode & 0o777 == 0o644


def test_publish_interrupted_after_the_history_entry_is_finished_by_recover(tmp_path):
    pub = Publisher(tmp_path, "M")
    pub.publish(_stage(pub, "v1"), {"version": 1})
    # Simulate a crash right after the history rename: v2 is complete in the history only.
    staged = _stage(pub, "v2")
    manifest = {"version": 2, "package_sha256": tree_sha256(staged / "M.mlpackage")}
    (staged / "M.json").write_text(json.dumps(manifest))
    os.rename(staged, pub.version_dir(2))
    assert pub.current()["version"] == 1
    assert pub.recover()["version"] == 2
    assert pub.current()["version"] == 2 and (pub.package / "Manifest.json").read_text() == "v2"
    assert pub.recover() is None  # nothing left to finish
    assert pub.next_version() == 3
