"""Publish a trained model into the output folder so readers never see a half-written one.

Layout of ``<output>``::

    <Name>.mlpackage              stable path the app build references
    <Name>.json                   manifest of the published version
    .watchtrain/versions/<Name>/v000N/   history: package, manifest, MLX weights
    .watchtrain/tmp/              staging (same filesystem, so renames are atomic)
    .watchtrain/trash/            replaced packages, deleted after a grace period

The new package replaces the old one with an atomic directory exchange
(``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS):
a reader opening ``<Name>.mlpackage`` gets either the whole old or the whole new
directory. The manifest is written after the package with write-temp-then-rename.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.weights import sha256_file

WORK_DIR = ".watchtrain"
MLX_WEIGHTS = "model.safetensors"
RETIRE_GRACE_SECONDS = 300.0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False when the OS or filesystem cannot."""
    try:
        libc = _libc()
        if sys.platform == "darwin":
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), ctypes.c_uint(0x2))  # RENAME_SWAP
        else:
            at_fdcwd, rename_exchange = -100, 0x2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), ctypes.c_uint(rename_exchange))
    except (AttributeError, OSError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def fsync_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tree_sha256(root: Path) -> dict[str, str]:
    """sha256 of every file in a package, by '/'-separated relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Publisher:
    output: Path
    name: str
    keep_versions: int = 5

    @property
    def package(self) -> Path:
        return self.output / f"{self.name}.mlpackage"

    @property
    def manifest_path(self) -> Path:
        return self.output / f"{self.name}.json"

    @property
    def versions(self) -> Path:
        return self.output / WORK_DIR / "versions" / self.name

    @property
    def tmp(self) -> Path:
        return self.output / WORK_DIR / "tmp"

    def current(self) -> dict[str, Any] | None:
        """The published manifest, or None."""
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def version_dir(self, version: int) -> Path:
        return self.versions / f"v{version:06d}"

    def next_version(self) -> int:
        seen = [int(p.name[1:]) for p in self.versions.glob("v*") if p.name[1:].isdigit()]
        published = (self.current() or {}).get("version", 0)
        return max([published, *seen]) + 1

    def staging(self) -> Path:
        """A fresh staging folder on the output's filesystem."""
        path = self.tmp / f"{self.name}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def clean_tmp(self) -> int:
        """Remove staging left by a crash (and expired retired packages); returns how many."""
        self.purge_trash()
        if not self.tmp.exists():
            return 0
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.name.startswith(f"{self.name}-"):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def publish(self, staged: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Publish ``staged`` (holding ``<Name>.mlpackage`` and MLX weights) as ``manifest['version']``."""
        package = staged / f"{self.name}.mlpackage"
        for path in [package, *package.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        manifest = {**manifest, "package_sha256": tree_sha256(package)}
        write_json_atomic(staged / f"{self.name}.json", manifest)
        fsync_tree(staged)
        version_dir = self.version_dir(manifest["version"])
        version_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, version_dir)  # history entry appears complete or not at all
        # From here on the version is decided: a crash before the manifest is written is
        # finished by recover() at the next start.
        self._install(version_dir, manifest)
        return manifest

    def _install(self, version_dir: Path, manifest: dict[str, Any]) -> None:
        """Make a complete history entry the published model."""
        incoming = self.staging() / f"{self.name}.mlpackage"
        shutil.copytree(version_dir / f"{self.name}.mlpackage", incoming)
        fsync_tree(incoming)
        self._replace_package(incoming)
        self._retire(incoming.parent)
        write_json_atomic(self.manifest_path, manifest)
        self.prune()

    def recover(self) -> dict[str, Any] | None:
        """Finish a publish that a crash interrupted after its history entry was complete.

        Returns the manifest it published, or None when there was nothing to finish.
        """
        published = (self.current() or {}).get("version", 0)
        entries = sorted((p for p in self.versions.glob("v*") if p.name[1:].isdigit()), reverse=True)
        for entry in entries:
            if int(entry.name[1:]) <= published:
                break
            try:
                manifest = json.loads((entry / f"{self.name}.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("package_sha256") == tree_sha256(entry / f"{self.name}.mlpackage"):
                self._install(entry, manifest)
                return manifest
        return None

    def _replace_package(self, incoming: Path) -> None:
        if not self.package.exists():
            os.rename(incoming, self.package)
        elif not exchange(incoming, self.package):
            # Filesystem without atomic exchange (some network shares): brief gap, never a mix.
            aside = incoming.with_name(incoming.name + ".old")
            os.rename(self.package, aside)
            os.rename(incoming, self.package)
        # After the exchange ``incoming`` holds the previous package.

    @property
    def trash(self) -> Path:
        return self.output / WORK_DIR / "trash"

    def _retire(self, old: Path) -> None:
        """Keep a replaced package readable for ``RETIRE_GRACE_SECONDS``: a reader that opened it
        before the exchange (an Xcode build copying it) finishes reading the old version."""
        self.trash.mkdir(parents=True, exist_ok=True)
        os.rename(old, self.trash / f"{time.time_ns()}-{self.name}-{uuid.uuid4().hex[:8]}")
        self.purge_trash()

    def purge_trash(self, grace: float | None = None) -> None:
        grace = RETIRE_GRACE_SECONDS if grace is None else grace
        if not self.trash.exists():
            return
        cutoff = time.time_ns() - int(grace * 1e9)
        for entry in self.trash.iterdir():
            stamp = entry.name.split("-", 1)[0]
            if stamp.isdigit() and int(stamp) < cutoff and f"-{self.name}-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)

    def prune(self) -> None:
        """Keep the newest ``keep_versions`` history entries (and always the published one)."""
        published = (self.current() or {}).get("version")
        entries = sorted(p for p in self.versions.glob("v*") if p.name[1:].isdigit())
        for entry in entries[: max(0, len(entries) - self.keep_versions)]:
            if int(entry.name[1:]) != published:
                shutil.rmtree(entry, ignore_errors=True)

    def mlx_weights(self, version: int | None = None) -> Path:
        """MLX weights of a published version (default: the current one)."""
        version = version or (self.current() or {}).get("version")
        if version is None:
            raise FileNotFoundError(f"no model named {self.name} is published in {self.output}")
        return self.version_dir(version) / MLX_WEIGHTS
