"""Independent check of a saved ``.mlpackage``: read it back from disk and run it with NumPy.

Core ML cannot run on Linux, so the verifier interprets the package's ML Program
itself: it parses ``model.mlmodel`` (the protobuf spec) and reads the weight blobs
from ``weights/weight.bin``, evaluates the operations watchtrain emits, and compares
class probabilities with the MLX model on real photos. An operation it does not know
is an error, never skipped. On macOS the package is also run with Core ML itself.

fp16 programs are emulated by rounding every fp16-typed value to float16 (weights
and activations) while computing in float32.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logging.getLogger("coremltools").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.libmilstoragepython import _BlobStorageReader
    from coremltools.proto import MIL_pb2

# Largest allowed |probability difference| against MLX's float32 model. A top-1
# disagreement is a failure unless MLX itself could not separate the two labels by more
# than that tolerance (a near-tie that reduced precision may legitimately flip); such
# photos are reported as `ambiguous`.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 0.1}

_DT = MIL_pb2.DataType
_NUMPY = {_DT.FLOAT16: np.float16, _DT.FLOAT32: np.float32, _DT.FLOAT64: np.float64, _DT.INT8: np.int8,
          _DT.INT16: np.int16, _DT.INT32: np.int32, _DT.INT64: np.int64, _DT.UINT8: np.uint8, _DT.BOOL: np.bool_}
_BLOB_READERS = {_DT.FLOAT16: "read_fp16_data", _DT.FLOAT32: "read_float_data", _DT.INT8: "read_int8_data",
                 _DT.UINT8: "read_uint8_data", _DT.INT16: "read_int16_data", _DT.INT32: "read_int32_data",
                 _DT.UINT16: "read_uint16_data", _DT.UINT32: "read_uint32_data"}


class VerificationError(RuntimeError):
    """The package is malformed, uses an unknown operation, or disagrees with MLX."""


@dataclass
class Program:
    """A package's main function, read from disk."""

    path: Path
    input_name: str
    outputs: list[str]
    operations: list[Any]
    weights_dir: Path
    labels: list[str]
    _blobs: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def blob(self, file_name: str) -> Any:
        path = self.weights_dir / file_name.replace("@model_path/weights/", "")
        key = str(path)
        if key not in self._blobs:
            if not path.is_file():
                raise VerificationError(f"{self.path}: weight file {path} is missing")
            self._blobs[key] = _BlobStorageReader(key)
        return self._blobs[key]


def _read_spec(package: Path) -> tuple[Any, Path]:
    """The package's model spec (protobuf) and the path of the file it came from."""
    package = Path(package)
    model_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if not model_file.is_file():
        raise VerificationError(f"{package}: not an .mlpackage (no {model_file.relative_to(package)})")
    spec = ct.proto.Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError
        raise VerificationError(f"{model_file}: unreadable model spec ({exc})") from exc
    return spec, model_file


def load_program(package: Path) -> Program:
    package = Path(package)
    spec, model_file = _read_spec(package)
    if spec.WhichOneof("Type") != "mlProgram":
        raise VerificationError(f"{package}: not an ML Program")
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    labels = _class_labels(block)
    return Program(package, main.inputs[0].name, list(block.outputs), list(block.operations),
                   model_file.parent / "weights", labels)


def _class_labels(block) -> list[str]:
    for op in block.operations:
        if op.type == "classify":
            value = op.inputs["classes"].arguments[0].value.immediateValue
            if value.HasField("list"):
                return [v.immediateValue.tensor.strings.values[0] for v in value.list.values]
            return list(value.tensor.strings.values)
    return []


def _value(program: Program, value) -> Any:
    """A MIL Value (immediate or blob) as NumPy / Python."""
    tensor_type = value.type.tensorType
    dtype = tensor_type.dataType
    shape = [d.constant.size for d in tensor_type.dimensions]
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        reader = _BLOB_READERS.get(dtype)
        if reader is None:
            raise VerificationError(f"{program.path}: blob of unsupported type {_DT.Name(dtype)}")
        with program.lock:  # batches run in threads; the blob reader is not known to be thread-safe
            data = np.asarray(getattr(program.blob(value.blobFileValue.fileName), reader)(value.blobFileValue.offset))
        if dtype == _DT.FLOAT16:
            data = data.view(np.float16)  # the reader returns the raw half-precision bits as uint16
        return data.astype(_NUMPY[dtype], copy=False).reshape(shape)
    if kind != "immediateValue" or not value.immediateValue.HasField("tensor"):
        raise VerificationError(f"{program.path}: unsupported constant ({kind})")
    t = value.immediateValue.tensor
    which = t.WhichOneof("value")
    if dtype == _DT.STRING:
        values = list(t.strings.values)
        return values[0] if not shape else values
    if which == "bytes":
        arr = np.frombuffer(t.bytes.values, dtype=_NUMPY[dtype]).copy()
    else:
        arr = np.array(list(getattr(t, which).values), dtype=_NUMPY.get(dtype, np.float32))
    return arr.reshape(shape) if shape else arr.reshape(()).item() if arr.size == 1 else arr


def _conv(x, weight, bias, strides, pad_type, pad, dilations, groups) -> np.ndarray:
    """NCHW convolution for the three kinds watchtrain emits: dense, depthwise and 1x1."""
    if any(d != 1 for d in np.atleast_1d(dilations)):
        raise VerificationError("conv with dilation is not emitted by watchtrain")
    weight = np.asarray(weight, np.float32)
    c_out, c_in_g, kh, kw = weight.shape
    if pad_type == "custom":
        top, bottom, left, right = (int(p) for p in pad)
    elif pad_type == "valid":
        top = bottom = left = right = 0
    else:
        raise VerificationError(f"conv pad_type {pad_type!r} is not emitted by watchtrain")
    x = np.asarray(x, np.float32)
    if top or bottom or left or right:
        x = np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)])
    sh, sw = (int(s) for s in strides)
    n, c_in, h, w = x.shape
    h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
    taps = [x[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw]
            for i in range(kh) for j in range(kw)]
    if groups == 1 and kh == kw == 1:
        y = np.einsum("nchw,oc->nohw", taps[0], weight[:, :, 0, 0], optimize=True)
    elif groups == 1:
        # im2col: [N*Ho*Wo, C_in*kh*kw] @ [C_in*kh*kw, C_out]
        cols = np.stack(taps, axis=-1).transpose(0, 2, 3, 1, 4).reshape(n * h_out * w_out, c_in * kh * kw)
        y = (cols @ weight.reshape(c_out, -1).T).reshape(n, h_out, w_out, c_out).transpose(0, 3, 1, 2)
    elif c_in_g == 1 and groups == c_in == c_out:  # depthwise
        kernel = weight.reshape(c_out, kh * kw)
        y = sum(tap * kernel[:, k][None, :, None, None] for k, tap in enumerate(taps))
    else:
        raise VerificationError(f"grouped conv (groups={groups}) is not emitted by watchtrain")
    if bias is not None:
        y = y + bias.astype(np.float32)[None, :, None, None]
    return y


def _softmax(x, axis) -> np.ndarray:
    x = x.astype(np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _op(op_type: str, a: dict[str, Any]) -> Any:
    if op_type == "mul":
        return np.multiply(a["x"], a["y"], dtype=np.float32)
    if op_type == "add":
        return np.add(a["x"], a["y"], dtype=np.float32)
    if op_type == "cast":
        dtype = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32}[a["dtype"]]
        return np.asarray(a["x"], np.float32) if dtype is np.float16 else np.asarray(a["x"]).astype(dtype)
    if op_type == "conv":
        return _conv(a["x"], a["weight"], a.get("bias"), a.get("strides", [1, 1]), a.get("pad_type", "valid"),
                     a.get("pad", [0, 0, 0, 0]), a.get("dilations", [1, 1]), int(a.get("groups", 1)))
    if op_type == "relu6":
        return np.clip(np.asarray(a["x"], np.float32), 0.0, 6.0)
    if op_type == "relu":
        return np.maximum(np.asarray(a["x"], np.float32), 0.0)
    if op_type == "reduce_mean":
        return np.asarray(a["x"], np.float32).mean(axis=tuple(np.atleast_1d(a["axes"])), keepdims=bool(a["keep_dims"]))
    if op_type == "linear":
        y = a["x"].astype(np.float32) @ a["weight"].astype(np.float32).T
        return y + a["bias"].astype(np.float32) if a.get("bias") is not None else y
    if op_type == "softmax":
        return _softmax(a["x"], int(a["axis"]))
    raise KeyError(op_type)


def _broadcast_to_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter along each axis to the full tensor shape."""
    param = np.asarray(param, dtype=np.float32).reshape((1,) * (len(shape) - np.ndim(param)) + np.shape(param))
    for axis, (size, blocks) in enumerate(zip(shape, param.shape)):
        if blocks != size:
            param = np.repeat(param, size // blocks, axis=axis)
    return param


def _affine_dequantize(a: dict[str, Any]) -> np.ndarray:
    data = a["quantized_data"].astype(np.float32)
    shape = [1] * data.ndim
    shape[int(a["axis"])] = -1
    zero = np.asarray(a["zero_point"], np.float32).reshape(shape if np.ndim(a["zero_point"]) else ())
    scale = np.asarray(a["scale"], np.float32).reshape(shape if np.ndim(a["scale"]) else ())
    return ((data - zero) * scale).astype(a["scale"].dtype)


def _blockwise_shift_scale(a: dict[str, Any]) -> np.ndarray:
    data = a["data"].astype(np.float32)
    offset = _broadcast_to_blocks(a["offset"], data.shape) if "offset" in a else 0.0
    return ((data - offset) * _broadcast_to_blocks(a["scale"], data.shape)).astype(a["scale"].dtype)


# Weight-compression ops coremltools emits for 8-bit weights (iOS16-17, iOS18+).
_CONSTEXPR = {"constexpr_affine_dequantize": _affine_dequantize,
              "constexpr_blockwise_shift_scale": _blockwise_shift_scale}


def run_program(program: Program, images: np.ndarray) -> np.ndarray:
    """Class probabilities ``[N, classes]`` for ``[N, 3, 224, 224]`` float32 pixels in [0, 255].

    Core ML runs the program on one image at a time; every op here is per-image, so a
    batch gives the same numbers faster.
    """
    env: dict[str, Any] = {program.input_name: images.astype(np.float32)}
    probs_name = None
    last_use = _last_uses(program)
    for index, op in enumerate(program.operations):
        for done in last_use.get(index, ()):  # free activations no later op reads (memory stays flat)
            env.pop(done, None)
        outputs = [o.name for o in op.outputs]
        if op.type == "const":
            env[outputs[0]] = _value(program, op.attributes["val"])
            continue
        if op.type == "classify":
            probs_name = op.inputs["probabilities"].arguments[0].name
            continue
        # Arguments arrive as attributes (iOS16 constexpr ops) or inputs bound by name or value.
        args = {k: _value(program, v) for k, v in op.attributes.items() if k != "name"}
        for name, argument in op.inputs.items():
            binding = argument.arguments[0]
            args[name] = env[binding.name] if binding.name else _value(program, binding.value)
        if op.type in _CONSTEXPR:
            env[outputs[0]] = _CONSTEXPR[op.type](args)
            continue
        try:
            result = _op(op.type, args)
        except KeyError as exc:
            if exc.args and exc.args[0] == op.type:
                raise VerificationError(f"{program.path}: operation {op.type!r} ({outputs[0]}) is not known to "
                                        "the verifier") from None
            raise
        # Storage precision is the op's declared output type: fp16 outputs are rounded.
        out_type = op.outputs[0].type.tensorType.dataType
        if out_type == _DT.FLOAT16 and isinstance(result, np.ndarray):
            result = result.astype(np.float16).astype(np.float32)  # kept as float32: no re-casts later
        elif out_type in _NUMPY and isinstance(result, np.ndarray):
            result = result.astype(_NUMPY[out_type])
        env[outputs[0]] = result
    if probs_name is None:
        raise VerificationError(f"{program.path}: no classify operation (not a classifier)")
    return np.asarray(env[probs_name], dtype=np.float32).reshape(len(images), -1)


def _last_uses(program: Program) -> dict[int, list[str]]:
    """{op index: variables read for the last time by the op before it}: they can be freed."""
    last: dict[str, int] = {}
    for index, op in enumerate(program.operations):
        if op.type == "classify":  # its probabilities are the result: never freed
            continue
        for argument in op.inputs.values():
            for binding in argument.arguments:
                if binding.name:
                    last[binding.name] = index
    freed: dict[int, list[str]] = {}
    for name, index in last.items():
        freed.setdefault(index + 1, []).append(name)
    return freed


@dataclass
class Report:
    package: str
    precision: str
    n: int
    top1_agreement: float
    max_abs_diff: float
    tolerance: float
    mismatches: list[str]
    ambiguous: list[str]  # near-ties (MLX margin within tolerance) that flipped: reported, allowed
    coreml_checked: bool
    coreml_max_abs_diff: float | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def _precision(program: Program) -> str:
    if any(op.type in _CONSTEXPR for op in program.operations):
        return "int8"
    for op in program.operations:
        if op.type == "conv":
            dtype = op.outputs[0].type.tensorType.dataType
            return "float16" if dtype == _DT.FLOAT16 else "float32"
    return "float32"


def _mismatches(names: list[str], got: np.ndarray, want: np.ndarray, precision: str) -> tuple[list[str], list[str]]:
    """(top-1 disagreements that fail, near-ties that flipped)."""
    failed, ambiguous = [], []
    for name, g, w in zip(names, got, want):
        if g.argmax() != w.argmax():
            margin = w[w.argmax()] - w[g.argmax()]
            (ambiguous if margin <= TOLERANCE[precision] else failed).append(name)
    return failed, ambiguous


def verify(package: Path, mlx_probs: np.ndarray, images: list[np.ndarray], names: list[str],
           labels: list[str] | None = None) -> Report:
    """Compare the package's probabilities on ``images`` (``[224,224,3]`` uint8) with MLX's."""
    if not Path(package).exists():
        raise VerificationError(f"{package}: no such package")
    program = load_program(package)
    if labels is not None and program.labels != list(labels):
        raise VerificationError(f"{package}: labels {program.labels[:5]}... differ from the model's {labels[:5]}...")
    precision = _precision(program)
    tolerance = TOLERANCE[precision]
    # NumPy releases the GIL in its kernels: one batch per core runs the photos in parallel.
    workers = max(1, min(os.cpu_count() or 1, len(images)))
    size = max(1, -(-len(images) // workers))
    batches = [np.stack(images[i : i + size]).transpose(0, 3, 1, 2) for i in range(0, len(images), size)]
    with ThreadPoolExecutor(workers) as pool:
        ours = np.concatenate(list(pool.map(lambda b: run_program(program, b), batches))) if batches else np.zeros((0, 1))
    diff = np.abs(ours - mlx_probs)
    mismatches, ambiguous = _mismatches(names, ours, mlx_probs, precision)
    agreement = float((ours.argmax(1) == mlx_probs.argmax(1)).mean()) if len(images) else 1.0
    report = Report(str(package), precision, len(images), agreement,
                    float(diff.max()) if diff.size else 0.0, tolerance, mismatches, ambiguous, coreml_checked=False)
    if sys.platform == "darwin":
        coreml = coreml_probabilities(package, images, program.labels)
        report.coreml_checked = True
        report.coreml_max_abs_diff = float(np.abs(coreml - mlx_probs).max())
        failed, flipped = _mismatches(names, coreml, mlx_probs, precision)
        report.mismatches += [f"{n} (Core ML)" for n in failed]
        report.ambiguous += [f"{n} (Core ML)" for n in flipped]
        report.max_abs_diff = max(report.max_abs_diff, report.coreml_max_abs_diff)
    return report


def package_version(package: Path) -> int | None:
    """The watchtrain version number stored in the package's own metadata."""
    value = _read_spec(package)[0].description.metadata.userDefined.get("watchtrain_model_version")
    return int(value) if value else None


def coreml_probabilities(package: Path, images: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """macOS only: run the package with Core ML itself (``MLModel.predict``)."""
    from PIL import Image

    model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
    rows = []
    for img in images:
        out = model.predict({"image": Image.fromarray(img)})["classLabelProbs"]
        rows.append([out[label] for label in labels])
    return np.asarray(rows, dtype=np.float32)
