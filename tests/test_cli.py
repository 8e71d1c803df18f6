"""`watchtrain train` and `watchtrain predict` as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT, clothing_photos


def _watchtrain(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, **(env or {})})


def test_train_then_predict(subset, weights_path, warm_embeddings, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy2(warm_embeddings, state / "embeddings.sqlite")
    out = tmp_path / "out"
    done = _watchtrain("train", str(subset["train"]), "--validation", str(subset["val"]), "--output", str(out),
                       "--name", "Subset", "--weights", str(weights_path), "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert f"published {out / 'Subset.mlpackage'} version 1" in done.stdout
    assert "validation: 15 photos" in done.stdout
    assert (out / "Subset.json").is_file()

    photos = [str(clothing_photos("validation", label)[7]) for label in ("hat", "pants", "shoes")]
    done = _watchtrain("predict", str(out / "Subset.mlpackage"), *photos, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    top1 = [max(result[p], key=result[p].get) for p in photos]
    assert top1 == ["hat", "pants", "shoes"]
    assert abs(sum(result[photos[0]].values()) - 1) < 1e-4

    done = _watchtrain("predict", "Subset", "--output", str(out), photos[0])
    assert done.returncode == 0 and done.stdout.startswith(photos[0] + ": hat")


def test_clear_errors(tmp_path, weights_path):
    done = _watchtrain("train", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), "--name", "X",
                       "--weights", str(weights_path), "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 1 and "nowhere" in done.stderr and "does not exist" in done.stderr
    done = _watchtrain("predict", str(tmp_path / "Missing.mlpackage"), str(tmp_path / "x.jpg"))
    assert done.returncode == 1 and "'Missing' is published" in done.stderr and "--output" in done.stderr
    done = _watchtrain("train", str(tmp_path), "--output", str(tmp_path / "o"), "--name", "X",
                       "--state-dir", str(tmp_path / "s"),
                       env={"WATCHTRAIN_WEIGHTS": str(tmp_path / "none.safetensors")})
    assert done.returncode == 1 and "WATCHTRAIN_WEIGHTS" in done.stderr
