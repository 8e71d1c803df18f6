"""Core ML export: an ML Program built with coremltools' MIL builder from the MLX weights.

No tracing and no torch: the program is written op by op from the same
(batch-norm folded) tensors the MLX model runs, so what ships is what trained.

- input ``image``: RGB 224x224; the normalization lives in the model (ImageType
  scale/bias, with per-channel std folded into the first convolution),
- outputs ``classLabel`` and ``classLabelProbs`` (the names Create ML uses).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import service  # noqa: F401
from mlx.utils import tree_flatten

from service.mobilenet import INPUT_SIZE, NORMALIZATIONS, InvertedResidual, MobileNetV2, pads_for

# On Linux coremltools logs "Failed to load _MLModelProxy" at import (it cannot run
# models there, which watchtrain never asks it to); keep that out of the JSON log.
logging.getLogger("coremltools").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

PROBS_OUTPUT = "classLabelProbs"
LABEL_OUTPUT = "classLabel"
TARGETS = {"iOS15": ct.target.iOS15, "iOS16": ct.target.iOS16, "iOS17": ct.target.iOS17,
           "iOS18": ct.target.iOS18}
PRECISIONS = {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "float16"
    weight_bits: int = 16  # 8: int8 linear weight quantization (needs iOS16+)
    minimum_target: str = "iOS15"  # iOS 15 / macOS 12
    author: str = "watchtrain"
    license: str = ""
    description: str = "Image classifier fine-tuned by watchtrain from MobileNetV2."
    version: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def _np(params: dict, key: str) -> np.ndarray:
    return np.array(params[key], dtype=np.float32)


def preprocessing(normalization: str) -> tuple[float, list[float], np.ndarray]:
    """ImageType ``(scale, bias)`` plus the per-channel factor to fold into the stem.

    Core ML computes ``scale * pixel + bias[c]`` with one scale for all channels;
    ``(x - mean[c]) / std[c]`` is that with ``scale = 1/std[0]`` followed by a
    multiplication by ``std[0] / std[c]``, which the stem convolution absorbs.
    """
    mean, std = (np.array(v, dtype=np.float64) for v in NORMALIZATIONS[normalization])
    scale = 1.0 / std[0]
    return float(scale), [float(-m * scale) for m in mean], (std[0] / std).astype(np.float32)


def _conv(x, params: dict, name: str, stride: int, padding: str, relu: bool, groups: int = 1,
          channel_scale: np.ndarray | None = None):
    w = _np(params, f"{name}.weight")
    if w.ndim == 2:  # pointwise [out, in]
        weight, pad = w[:, :, None, None], [0, 0, 0, 0]
    else:  # [out, kh, kw, in] -> OIHW
        weight = w.transpose(0, 3, 1, 2)
        before, after = pads_for(stride, padding)
        pad = [before, after, before, after]
    if channel_scale is not None:
        weight = weight * channel_scale[None, :, None, None]
    y = mb.conv(x=x, weight=weight, bias=_np(params, f"{name}.bias"), strides=[stride, stride],
                pad_type="custom", pad=pad, groups=groups)
    return mb.relu6(x=y) if relu else y


def build_program(model: MobileNetV2, opset: ct.target):
    """A fresh MIL program (coremltools mutates a program when converting it)."""
    params = dict(tree_flatten(model.parameters()))
    padding = model.spec.padding
    _, _, fold = preprocessing(model.spec.normalization)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, INPUT_SIZE, INPUT_SIZE))], opset_version=opset)
    def prog(image):
        x = _conv(image, params, "features.0", 2, padding, relu=True, channel_scale=fold)
        for i, block in enumerate(model.features[1:-1], start=1):
            assert isinstance(block, InvertedResidual)
            y = x
            if block.expand is not None:
                y = _conv(y, params, f"features.{i}.expand", 1, padding, relu=True)
            stride = block.depthwise.stride
            y = _conv(y, params, f"features.{i}.depthwise", stride, padding, relu=True,
                      groups=block.depthwise.weight.shape[0])
            y = _conv(y, params, f"features.{i}.project", 1, padding, relu=False)
            x = mb.add(x=x, y=y) if block.residual else y
        x = _conv(x, params, "features.18", 1, padding, relu=True)
        x = mb.reduce_mean(x=x, axes=[2, 3], keep_dims=False)
        x = mb.linear(x=x, weight=_np(params, "classifier.weight"), bias=_np(params, "classifier.bias"))
        return mb.softmax(x=x, axis=-1, name="probs")

    return prog


def export(model: MobileNetV2, labels: list[str], dest: Path, options: ExportOptions = ExportOptions()) -> Path:
    """Convert and save ``dest`` (an ``.mlpackage`` path). Returns ``dest``."""
    if len(labels) != model.spec.num_classes:
        raise ValueError(f"{len(labels)} labels for a {model.spec.num_classes}-class head")
    if options.weight_bits == 8 and options.minimum_target == "iOS15":
        raise ValueError("8-bit weights need minimum_deployment_target iOS16 or later")
    scale, bias, _ = preprocessing(model.spec.normalization)
    image = ct.ImageType(name="image", shape=(1, 3, INPUT_SIZE, INPUT_SIZE), scale=scale, bias=bias,
                         color_layout=ct.colorlayout.RGB)
    # coremltools prints progress bars and version warnings; the daemon's log is JSON only.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            build_program(model, TARGETS[options.minimum_target]),
            convert_to="mlprogram",
            inputs=[image],
            classifier_config=ct.ClassifierConfig(list(labels), predicted_feature_name=LABEL_OUTPUT,
                                                  predicted_probabilities_output="probs"),
            compute_precision=PRECISIONS[options.precision],
            minimum_deployment_target=TARGETS[options.minimum_target],
            skip_model_load=True,
        )
        if options.weight_bits == 8:
            mlmodel = quantize_8bit(mlmodel)
        spec = mlmodel.get_spec()
        ct.utils.rename_feature(spec, f"{LABEL_OUTPUT}_probs", PROBS_OUTPUT)
        _describe(spec, options)
        final = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
        final.save(str(dest))
    return dest


def quantize_8bit(mlmodel):
    """int8 weights with a per-output-channel scale (coremltools' linear quantization, iOS16+)."""
    import coremltools.optimize as cto

    config = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel"))
    with np.errstate(all="ignore"):  # all-zero channels give scale 0; their weights stay 0
        return cto.coreml.linear_quantize_weights(mlmodel, config=config)


def _describe(spec, options: ExportOptions) -> None:
    """What Xcode shows: description, author, license, version, user metadata, feature docs."""
    meta = spec.description.metadata
    meta.shortDescription = options.description
    meta.author = options.author
    meta.license = options.license
    meta.versionString = options.version
    for key, value in options.metadata.items():
        meta.userDefined[key] = str(value)
    docs = {
        "image": "Photo to classify (RGB; Vision's .scaleFill matches training).",
        LABEL_OUTPUT: "Most likely label.",
        PROBS_OUTPUT: "Probability of each label.",
    }
    for feature in list(spec.description.input) + list(spec.description.output):
        feature.shortDescription = docs.get(feature.name, "")
