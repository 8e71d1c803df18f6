"""watchtrain's MLX CPU kernel (service/native/depthwise.cpp): built on first use, cached, checked.

MLX's CPU backend has no fast depthwise convolution (see the C++ file). On Linux
watchtrain builds a small MLX extension with CMake and nanobind into the user cache
the first time a model runs (about 20 s, once per machine and MLX version), loads it,
and checks it against the pure-MLX formulation on a small input, gradients included.
If any step fails the model falls back to that formulation and a warning says why;
``$WATCHTRAIN_NATIVE=0`` turns the kernel off. On macOS MLX runs on Metal and the
kernel is never built.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import structlog

SOURCE_DIR = Path(__file__).with_name("native")
MODULE = "_watchtrain_native"

_lock = threading.Lock()
_loaded: ModuleType | None = None
_tried = False
status = "not loaded"
"""What happened: "loaded <path>", "disabled (...)" or "unavailable: <reason>"."""


def kernel() -> ModuleType | None:
    """The checked extension module, or None where it is off or could not be built."""
    global _loaded, _tried, status
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            _loaded, status = _load()
            _tried = True
            log = structlog.get_logger()
            (log.info if _loaded else log.warning)("native_kernel", status=status)
    return _loaded


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("WATCHTRAIN_NATIVE", "1") == "0":
        return None, "disabled ($WATCHTRAIN_NATIVE=0)"
    if sys.platform != "linux":
        return None, "disabled (MLX uses Metal or Accelerate here)"
    try:
        path = build()
        module = _import(path)
        _self_test(module)
    except Exception as exc:  # any failure means: run the pure-MLX formulation
        return None, f"unavailable: {type(exc).__name__}: {str(exc).strip()[:600]}"
    return module, f"loaded {path}"


def _build_key() -> str:
    import mlx.core as mx
    import nanobind

    digest = hashlib.sha256()
    for source in sorted(SOURCE_DIR.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(f"{mx.__version__}|{nanobind.__version__}|{sys.version}|{platform.machine()}".encode())
    digest.update(_cpu_flags().encode())  # built with -march=native
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def build_dir() -> Path:
    from service.weights import user_cache_dir

    return user_cache_dir() / "native" / _build_key()


def build() -> Path:
    """Build the extension (once; other processes wait on a file lock) and return the .so path."""
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(out.glob(f"{MODULE}*.so"))
        if found:
            return found[0]
        cmake = _cmake()
        work = out / "build"
        shutil.rmtree(work, ignore_errors=True)
        for args in ([cmake, "-S", str(SOURCE_DIR), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release",
                      f"-DPython_EXECUTABLE={sys.executable}"],
                     [cmake, "--build", str(work), "-j", str(os.cpu_count() or 2)]):
            done = subprocess.run(args, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                output = (done.stdout + done.stderr).splitlines()
                errors = [line for line in output if "error" in line.lower()][:5] or output[-5:]
                raise RuntimeError(f"`cmake {args[1]}` failed (exit {done.returncode}): " + " | ".join(errors))
        built = next(work.glob(f"{MODULE}*.so"))
        tmp = out / (built.name + ".tmp")
        shutil.copy2(built, tmp)
        tmp.replace(out / built.name)  # atomic: a reader never sees a half-copied library
        shutil.rmtree(work, ignore_errors=True)
        return out / built.name


def _cmake() -> str:
    beside = Path(sys.executable).with_name("cmake")  # the `cmake` wheel in this environment
    found = str(beside) if beside.exists() else shutil.which("cmake")
    if not found:
        raise RuntimeError("cmake not found (pip install cmake)")
    return found


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _self_test(module: ModuleType) -> None:
    """The kernel must match the pure-MLX formulation, forward and gradients, at both strides."""
    import mlx.core as mx
    import numpy as np

    from service.mobilenet import depthwise_reference, stem_reference

    rng = np.random.default_rng(0)
    for stride, pads in ((2, (0, 1)), (2, (1, 1))):
        x = mx.array(rng.uniform(-1, 1, (2, 12, 10, 3)).astype(np.float32))
        w = mx.array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32))
        b = mx.array(rng.normal(size=(8,)).astype(np.float32))
        want, have = stem_reference(x, w, b, stride, pads), module.stem3x3_relu6(x, w, b, stride, [*pads, *pads])
        if want.shape != have.shape or not np.allclose(np.array(want), np.array(have), atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"self-test mismatch in the stem at stride {stride}, pads {pads}")
    for stride, pads, fused in ((1, (1, 1), False), (2, (0, 1), True), (2, (1, 1), False), (1, (1, 1), True)):
        x = mx.array(rng.uniform(-1, 7, (2, 9, 10, 12)).astype(np.float32))
        w = mx.array(rng.normal(size=(9, 12)).astype(np.float32))
        b = mx.array(rng.normal(size=(12,)).astype(np.float32))
        ib = mx.array(rng.normal(size=(12,)).astype(np.float32))

        def ref(x, w, b, ib):
            return depthwise_reference(x, w, b, stride, pads, ib if fused else None)

        def got(x, w, b, ib):
            return module.depthwise3x3_relu6(x, w, b, stride, [*pads, *pads], ib if fused else None)

        cot = mx.array(rng.normal(size=ref(x, w, b, ib).shape).astype(np.float32))
        args = (x, w, b, ib)
        wanted = (ref(*args), *mx.grad(lambda *a: (ref(*a) * cot).sum(), argnums=(0, 1, 2, 3))(*args))
        found = (got(*args), *mx.grad(lambda *a: (got(*a) * cot).sum(), argnums=(0, 1, 2, 3))(*args))
        for want, have in zip(wanted, found):
            if want.shape != have.shape or not np.allclose(np.array(want), np.array(have), atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"self-test mismatch at stride {stride}, pads {pads}, fused input {fused}")
