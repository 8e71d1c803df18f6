"""watchtrain's MLX CPU kernels (service/native/kernels.cpp): built on first use, cached, checked.

MLX's CPU backend has no fast depthwise convolution and runs elementwise ops on one thread
(see the C++ file). On Linux watchtrain builds a small MLX extension with CMake and nanobind
into the user cache the first time a model runs (about 20 s, once per machine and MLX
version), loads it, and checks every kernel against the pure-MLX formulation on small
inputs, gradients included. If any step fails the model falls back to that formulation and a
warning says why; ``$WATCHTRAIN_NATIVE=0`` turns the kernels off. On macOS MLX runs on Metal
and the kernels are never built.
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
    """The kernels must match the pure-MLX formulation, forward and gradients, at both strides."""
    import mlx.core as mx
    import numpy as np

    from service.mobilenet import block_reference, depthwise_reference, pointwise_reference, stem_reference

    rng = np.random.default_rng(0)

    def rand(*shape: int, scale: float = 1.0, low: float | None = None, high: float | None = None) -> mx.array:
        values = rng.normal(size=shape) * scale if low is None else rng.uniform(low, high, shape)
        return mx.array(values.astype(np.float32))

    for stride, pads in ((2, (0, 1)), (2, (1, 1))):
        _same(f"the stem at stride {stride}, pads {pads}", rng,
              lambda *a: stem_reference(*a, stride, pads), lambda *a: module.stem3x3_relu6(*a, stride, [*pads, *pads]),
              (rand(2, 12, 10, 3, low=-1, high=1), rand(8, 3, 3, 3), rand(8)), gradients=False)
    for stride, pads, fused in ((1, (1, 1), False), (2, (0, 1), True), (2, (1, 1), False), (1, (1, 1), True)):
        _same(f"the depthwise step at stride {stride}, pads {pads}, fused input {fused}", rng,
              lambda x, w, b, ib: depthwise_reference(x, w, b, stride, pads, ib if fused else None),
              lambda x, w, b, ib: module.depthwise3x3_relu6(x, w, b, stride, [*pads, *pads], ib if fused else None),
              (rand(2, 9, 10, 16, low=-1, high=7), rand(9, 16), rand(16), rand(16)))
    for pool in (False, True):
        _same(f"the 1x1 convolution with relu6, pooled {pool}", rng,
              lambda x, w, b: pointwise_reference(x, w, b, pool=pool),
              lambda x, w, b: module.pointwise_relu6(x, w, b, pool),
              (rand(2, 5, 6, 12, low=-1, high=2), rand(16, 12, scale=0.5), rand(16)))
    # Expanding and residual; stride 2 with TensorFlow SAME padding; no expansion (the first block).
    for stride, pads, cin, hidden, cout in ((1, (1, 1), 8, 24, 8), (2, (0, 1), 8, 16, 16), (1, (1, 1), 16, 16, 8)):
        expand = (rand(hidden, cin, scale=0.5), rand(hidden)) if hidden != cin else ()
        _same(f"the inverted residual block at stride {stride}, pads {pads}, {cin}->{hidden}->{cout}", rng,
              lambda *a: block_reference(*a[:5], stride, pads, *a[5:]),
              lambda *a: module.inverted_residual(*a[:5], stride, [*pads, *pads], *a[5:]),
              (rand(2, 9, 10, cin, low=-1, high=2), rand(9, hidden, scale=0.5), rand(hidden),
               rand(cout, hidden, scale=0.3), rand(cout), *expand))


def _same(what: str, rng, reference, kernel, args: tuple, gradients: bool = True) -> None:
    """Raise unless ``kernel(*args)`` equals ``reference(*args)``, and so do their gradients."""
    import mlx.core as mx
    import numpy as np

    want = reference(*args)
    cotangent = mx.array(rng.normal(size=want.shape).astype(np.float32))
    wanted, found = [want], [kernel(*args)]
    if gradients:
        argnums = tuple(range(len(args)))
        for fn, into in ((reference, wanted), (kernel, found)):
            into.extend(mx.grad(lambda *a: (fn(*a) * cotangent).sum(), argnums=argnums)(*args))
    for a, b in zip(wanted, found):
        a, b = np.array(a), np.array(b)
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(a).max())), rtol=1e-4):
            raise RuntimeError(f"self-test mismatch in {what}")
