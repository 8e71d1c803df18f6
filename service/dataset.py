"""Scan a Create ML style dataset: ``<root>/<label>/**/<photo>``.

Photos in nested folders inside a label folder belong to that label. Hidden
files and folders (``.DS_Store``, AppleDouble ``._*``, ``.git``), partial
downloads and non-image extensions are ignored. Without a separate validation
folder, a photo is held out for validation by a hash of its path relative to its
label folder, so the split never changes as other photos come and go, and a
photo moved to another label stays on the same side of the split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".heic", ".heif", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
)
PARTIAL_SUFFIXES = frozenset({".part", ".partial", ".crdownload", ".download", ".tmp", ".temp"})


class DatasetError(ValueError):
    """The dataset cannot be trained on (the message says why and where)."""


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str
    relpath: str  # relative to the dataset root, '/'-separated
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Dataset:
    labels: tuple[str, ...]
    train: tuple[Photo, ...]
    val: tuple[Photo, ...]

    @property
    def photos(self) -> tuple[Photo, ...]:
        return self.train + self.val


def is_candidate(name: str) -> bool:
    """Would a file with this name be read as a photo?"""
    if name.startswith(".") or name.endswith("~"):
        return False
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES and suffix not in PARTIAL_SUFFIXES


def is_relevant(path: Path, root: Path) -> bool:
    """Is ``path`` (an event path, maybe deleted) a photo or folder that matters to ``root``?"""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return False
    if any(part.startswith(".") for part in rel.parts):
        return False
    return len(rel.parts) <= 1 or path.suffix == "" or is_candidate(path.name)


def photos_under(folder: Path, limit: int | None = None) -> list[Path]:
    """Candidate photos anywhere under ``folder``, sorted, at most ``limit`` (no labels needed)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    photos = sorted(p for p in folder.rglob("*") if p.is_file() and is_candidate(p.name))
    if not photos:
        raise FileNotFoundError(f"no photos under {folder}")
    return photos[:limit]


def scan_folder(root: Path) -> list[Photo]:
    """All candidate photos under ``root``, sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    photos: list[Photo] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(label_dir):  # followlinks=False: no loops
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not is_candidate(name):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                    size, mtime = st.st_size, st.st_mtime_ns
                except FileNotFoundError:
                    continue  # deleted since the listing: not part of the dataset any more
                except OSError:
                    size, mtime = -1, 0  # symlink loop and the like: kept, so reading it reports why
                photos.append(Photo(path, label_dir.name, path.relative_to(root).as_posix(), size, mtime))
    return photos


CLOCK_SKEW_NS = 60 * 10**9


def unsettled(photos: list[Photo], settle_seconds: float, now_ns: int) -> list[Photo]:
    """Photos modified within the last ``settle_seconds``: probably still being copied.

    An mtime more than a minute in the future is clock skew (a camera, another machine),
    not a write in progress: such a photo would otherwise never settle.
    """
    if settle_seconds <= 0:
        return []
    cutoff = now_ns - int(settle_seconds * 1e9)
    return [p for p in photos if cutoff < p.mtime_ns <= now_ns + CLOCK_SKEW_NS]


def holdout(photo: Photo, fraction: float) -> bool:
    """Deterministic validation membership from the path inside the label folder."""
    within_label = photo.relpath.split("/", 1)[1]
    h = int.from_bytes(hashlib.sha256(within_label.encode("utf-8")).digest()[:8], "big")
    return (h / 2**64) < fraction


def split(photos: list[Photo], fraction: float) -> tuple[list[Photo], list[Photo]]:
    """Hash split; a label that would have no training photo keeps all its photos for training."""
    train, val = [], []
    for photo in photos:
        (val if holdout(photo, fraction) else train).append(photo)
    train_labels = {p.label for p in train}
    moved = [p for p in val if p.label not in train_labels]
    return train + moved, [p for p in val if p.label in train_labels]


def labels_of(photos: list[Photo]) -> tuple[str, ...]:
    return tuple(sorted({p.label for p in photos}))


def check_labels(labels: tuple[str, ...], root: Path) -> None:
    if len(labels) < 2:
        found = ", ".join(labels) or "none"
        raise DatasetError(
            f"{root}: a classifier needs at least two label folders with photos (found: {found})"
        )
