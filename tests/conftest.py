"""Shared fixtures: the real weights and photos from ../shared, copied into temp folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import structlog

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(__import__("os").environ.get("WATCHTRAIN_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.safetensors"
SAMPLES = SHARED / "imagenet-samples"
CLOTHING = SHARED / "datasets" / "clothing-small"
SUBSET_LABELS = ("hat", "pants", "shoes")
PER_LABEL = 15


@pytest.fixture(scope="session")
def weights_path() -> Path:
    if not WEIGHTS.is_file():
        pytest.fail(f"real weights missing: {WEIGHTS} (tests need ../shared; see README)")
    return WEIGHTS


@pytest.fixture(scope="session")
def imagenet_model(weights_path):
    from service import weights

    return weights.load(weights_path)


def clothing_photos(split: str, label: str) -> list[Path]:
    photos = sorted((CLOTHING / split / label).glob("*.jpg"))
    if not photos:
        pytest.fail(f"real photos missing under {CLOTHING / split / label}")
    return photos


def copy_subset(dest: Path, split: str = "train", labels=SUBSET_LABELS, start: int = 0,
                count: int = PER_LABEL) -> Path:
    for label in labels:
        (dest / label).mkdir(parents=True, exist_ok=True)
        for photo in clothing_photos(split, label)[start : start + count]:
            shutil.copy2(photo, dest / label / photo.name)
    return dest


@pytest.fixture
def subset(tmp_path) -> dict[str, Path]:
    """3 labels x 15 real training photos, 3 x 5 validation photos, and 5 unseen hat photos."""
    train = copy_subset(tmp_path / "dataset")
    val = copy_subset(tmp_path / "validation", split="validation", count=5)
    extra = tmp_path / "extra"
    extra.mkdir()
    for photo in clothing_photos("train", "hat")[PER_LABEL : PER_LABEL + 5]:
        shutil.copy2(photo, extra / photo.name)
    return {"train": train, "val": val, "extra": extra, "root": tmp_path}


@pytest.fixture(scope="session")
def warm_embeddings(tmp_path_factory, weights_path) -> Path:
    """An embedding cache already holding the subset's train and validation photos."""
    from service.embeddings import EmbeddingCache, embed
    from service.dataset import scan_folder
    from service import weights

    root = tmp_path_factory.mktemp("warm")
    train = copy_subset(root / "dataset")
    val = copy_subset(root / "validation", split="validation", count=5)
    model, info = weights.load(weights_path)
    cache = EmbeddingCache(root / "embeddings.sqlite")
    embed(model, info.sha256, scan_folder(train) + scan_folder(val), cache)
    cache.close()
    return root / "embeddings.sqlite"


@pytest.fixture
def job_for(weights_path, tmp_path, warm_embeddings):
    """Build a Job on a subset; ``warm=True`` starts from the pre-filled embedding cache."""
    from service.pipeline import Job

    def make(data: dict[str, Path], warm: bool = True, **kw) -> Job:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        if warm and not (state / "embeddings.sqlite").exists():
            shutil.copy2(warm_embeddings, state / "embeddings.sqlite")
        return Job(name=kw.pop("name", "Subset"), dataset=data["train"], validation=kw.pop("validation", data["val"]),
                   output=tmp_path / "out", state_dir=state, weights=kw.pop("weights", weights_path), **kw)

    return make


@pytest.fixture
def captured():
    """structlog's documented test idiom: every event logged inside, as dicts."""
    with structlog.testing.capture_logs() as events:
        yield events


def events_named(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]
