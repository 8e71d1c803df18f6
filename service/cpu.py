"""MLX CPU-backend setup: an optimized BLAS loaded before MLX, and a buffer cache large enough.

The ``mlx[cpu]`` wheel links a reference BLAS (about 5 GFLOPS for a float32
matmul on 2 cores). Loading OpenBLAS with global symbols before ``mlx.core``
is first imported makes MLX resolve ``sgemm`` and friends to it (about 35x
faster). On macOS MLX uses Accelerate or Metal, so nothing is done there.

MLX's CPU buffer cache defaults to 32 MB, smaller than one activation tensor of a
batch of 16 photos, so every large buffer came fresh from the OS and was page-faulted
in again (a 1x1 convolution at 112x112 spent more than half its time so). Runs raise
the limit while they work and give the memory back when they finish.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

# Debian/Ubuntu (libopenblas0-pthread), Fedora, Alpine, Homebrew-on-Linux layouts.
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/home/linuxbrew/.linuxbrew/lib/libopenblas.so",
)

loaded: str | None = None
"""Path of the BLAS library that was preloaded, or None."""


def find_blas() -> str | None:
    """Return the path of an optimized BLAS library, honouring $WATCHTRAIN_BLAS."""
    override = os.environ.get("WATCHTRAIN_BLAS")
    if override is not None:
        return override or None  # an empty value turns the preload off
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def preload() -> str | None:
    """Load the BLAS globally if MLX has not been imported yet; return its path."""
    global loaded
    if loaded or sys.platform == "darwin" or "mlx.core" in sys.modules:
        return loaded
    path = find_blas()
    if path:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded = path
        except OSError:
            loaded = None
    return loaded


BUFFER_CACHE_BYTES = 512 << 20  # measured: 256 MB already holds a batch of 16 at full speed


def use_buffer_cache(limit: int = BUFFER_CACHE_BYTES) -> None:
    """Let MLX keep up to ``limit`` bytes of freed buffers for reuse (never lowers a larger limit)."""
    import mlx.core as mx

    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


def release_memory() -> None:
    """Return MLX's cached buffers to the OS (the daemon is idle between runs)."""
    import mlx.core as mx

    mx.clear_cache()
