"""MobileNetV2 in MLX, inference-mode batch norm folded into the convolutions.

Layout follows torchvision: ``features[0]`` is the stem, ``features[1..17]`` the
inverted residual blocks, ``features[18]`` the final 1x1 convolution, then global
average pooling and a linear classifier. Tensors are NHWC.

1x1 convolutions are GEMMs with the bias inside (``mx.addmm``). On MLX's CPU backend the
stem, the depthwise 3x3 convolutions and the final 1x1 convolution (with the pooling) run
watchtrain's kernels (``service/native.py``), and in inference (``eval()``) mode each
inverted residual block runs as one fused kernel;
elsewhere the stem is ``mx.conv2d`` and a depthwise convolution nine shifted
multiply-adds (MLX's grouped ``conv2d`` is slow on the CPU). All are exact; all but the
native stem (never trained) are differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass

import service  # noqa: F401  (preloads BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from service import native

# (expansion t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
FEATURE_DIM = 1280
INPUT_SIZE = 224

NORMALIZATIONS = {
    # pixels in [0, 255] -> (x - mean) / std
    "inception": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}
PADDINGS = ("tf_same", "symmetric")


@dataclass(frozen=True)
class ModelSpec:
    """How a set of weights must be run (from the safetensors metadata)."""

    padding: str = "symmetric"
    normalization: str = "imagenet"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; expected one of {PADDINGS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {self.normalization!r}; expected one of {tuple(NORMALIZATIONS)}"
            )


def pads_for(stride: int, padding: str) -> tuple[int, int]:
    """(before, after) padding of a 3x3 convolution, per spatial axis."""
    if stride == 2 and padding == "tf_same":
        return (0, 1)  # TensorFlow SAME on even sizes pads bottom/right only
    return (1, 1)


def _cpu_kernel(*channels: int):
    """watchtrain's native kernels when MLX runs on the CPU, they are available and every channel
    count is a multiple of 8 (all of MobileNetV2's are), else None."""
    if mx.default_device() != mx.cpu or any(c % 8 for c in channels):
        return None
    return native.kernel()


def _relu6(x: mx.array) -> mx.array:
    return mx.minimum(mx.maximum(x, 0.0), 6.0)


def _shifted(x: mx.array, stride: int, pads: tuple[int, int]) -> list[mx.array]:
    """The nine strided 3x3 windows of NHWC ``x``, in (kh, kw) order."""
    x = mx.pad(x, [(0, 0), pads, pads, (0, 0)])
    h_out = (x.shape[1] - 3) // stride + 1
    w_out = (x.shape[2] - 3) // stride + 1
    return [
        x[:, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride, :]
        for i in range(3)
        for j in range(3)
    ]


class Conv3x3(nn.Module):
    """Dense 3x3 convolution + bias + relu6 (the stem). weight: [out, 3, 3, in].

    On MLX's CPU backend it runs watchtrain's kernel (service/native.py); elsewhere :func:`stem_reference`.
    """

    def __init__(self, cin: int, cout: int, stride: int, padding: str):
        super().__init__()
        self.weight = mx.zeros((cout, 3, 3, cin))
        self.bias = mx.zeros((cout,))
        self.stride = stride
        self.pads = pads_for(stride, padding)

    def __call__(self, x: mx.array) -> mx.array:
        kernel = _cpu_kernel(self.weight.shape[0])
        if kernel is not None:  # forward only: the stem is never trained
            return kernel.stem3x3_relu6(x, self.weight, self.bias, self.stride, [*self.pads, *self.pads])
        return stem_reference(x, self.weight, self.bias, self.stride, self.pads)


def stem_reference(x: mx.array, weight: mx.array, bias: mx.array, stride: int, pads: tuple[int, int]) -> mx.array:
    """relu6(dense 3x3 convolution + bias) in pure MLX (mx.conv2d measured faster than im2col here)."""
    x = mx.pad(x, [(0, 0), pads, pads, (0, 0)])
    return _relu6(mx.conv2d(x, weight, stride=stride) + bias)


def depthwise_reference(x: mx.array, taps: mx.array, bias: mx.array, stride: int, pads: tuple[int, int],
                        in_bias: mx.array | None = None) -> mx.array:
    """relu6(depthwise 3x3 of NHWC ``a(x)`` + bias) as nine shifted multiply-adds; taps: [9, C];
    ``a(x) = relu6(x + in_bias)`` when ``in_bias`` is given, else ``x``.

    Pure MLX: what runs on Metal, and the reference the native CPU kernel is checked against.
    """
    if in_bias is not None:
        x = _relu6(x + in_bias)
    windows = _shifted(x, stride, pads)
    y = windows[0] * taps[0]
    for k in range(1, 9):
        y = y + windows[k] * taps[k]
    return _relu6(y + bias)


def block_reference(x: mx.array, taps: mx.array, bias: mx.array, project: mx.array, project_bias: mx.array,
                    stride: int, pads: tuple[int, int], expand: mx.array | None = None,
                    expand_bias: mx.array | None = None) -> mx.array:
    """An inverted residual block in pure MLX, from the arrays the fused kernel takes (1x1 weights [out, in])."""
    h = x if expand is None else _relu6(x @ expand.T + expand_bias)
    y = depthwise_reference(h, taps, bias, stride, pads) @ project.T + project_bias
    return x + y if stride == 1 and x.shape[-1] == y.shape[-1] else y


class Depthwise3x3(nn.Module):
    """Depthwise 3x3 convolution + bias + relu6. weight: [C, 3, 3, 1].

    On MLX's CPU backend it runs watchtrain's fused kernel (service/native.py, 5-10x
    faster there); elsewhere, or if the kernel is unavailable, :func:`depthwise_reference`.
    """

    def __init__(self, channels: int, stride: int, padding: str):
        super().__init__()
        self.weight = mx.zeros((channels, 3, 3, 1))
        self.bias = mx.zeros((channels,))
        self.stride = stride
        self.pads = pads_for(stride, padding)

    def __call__(self, x: mx.array, in_bias: mx.array | None = None) -> mx.array:
        """With ``in_bias``, ``x`` is the expand convolution before its bias and relu6, which are
        applied as the kernel reads it: one pass fewer over the block's largest tensor."""
        kernel = _cpu_kernel(self.weight.shape[0])
        if kernel is not None:
            return kernel.depthwise3x3_relu6(x, self.taps(), self.bias, self.stride, [*self.pads, *self.pads], in_bias)
        return depthwise_reference(x, self.taps(), self.bias, self.stride, self.pads, in_bias)

    def taps(self) -> mx.array:
        """The weights as [9, C] in (kh, kw) order, contiguous."""
        return mx.contiguous(self.weight.reshape(self.weight.shape[0], 9).T)


def pointwise_reference(x: mx.array, weight: mx.array, bias: mx.array, relu6: bool = True,
                        pool: bool = False) -> mx.array:
    """A 1x1 convolution (weight [out, in]) in pure MLX, then relu6 and, with ``pool``, the mean
    over H and W. The bias goes into the GEMM and relu6 clips with scalars: a broadcast [C]
    operand would send MLX's CPU backend down its slow strided elementwise path."""
    y = mx.addmm(bias, x, weight.T)
    y = _relu6(y) if relu6 else y
    return mx.mean(y, axis=(1, 2)) if pool else y


class Pointwise(nn.Module):
    """1x1 convolution as a matmul over the channel axis. weight: [out, in]."""

    def __init__(self, cin: int, cout: int, relu6: bool):
        super().__init__()
        self.weight = mx.zeros((cout, cin))
        self.bias = mx.zeros((cout,))
        self.relu6 = relu6

    def __call__(self, x: mx.array) -> mx.array:
        kernel = _cpu_kernel(self.weight.shape[0]) if self.relu6 else None
        if kernel is not None:  # GEMM, bias and relu6 in one multithreaded pass
            return kernel.pointwise_relu6(x, self.weight, self.bias)
        return pointwise_reference(x, self.weight, self.bias, self.relu6)

    def pooled(self, x: mx.array) -> mx.array:
        """The output's mean over each image's pixels (NHWC -> [B, C]): global average pooling."""
        kernel = _cpu_kernel(self.weight.shape[0]) if self.relu6 else None
        if kernel is not None:  # pooled as it is computed; its gradient never broadcasts a copy
            return kernel.pointwise_relu6(x, self.weight, self.bias, pool=True)
        return pointwise_reference(x, self.weight, self.bias, self.relu6, pool=True)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, padding: str):
        super().__init__()
        hidden = cin * expand
        self.expand = Pointwise(cin, hidden, relu6=True) if expand != 1 else None
        self.depthwise = Depthwise3x3(hidden, stride, padding)
        self.project = Pointwise(hidden, cout, relu6=False)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: mx.array) -> mx.array:
        kernel = _cpu_kernel(self.depthwise.weight.shape[0], self.project.weight.shape[0])
        if kernel is not None and not self.training:
            return self._fused(kernel, x)
        if self.expand is None:
            y = self.depthwise(x)
        else:  # expand's bias and relu6 happen inside the depthwise step
            y = self.depthwise(x @ self.expand.weight.T, in_bias=self.expand.bias)
        y = self.project(y)
        return x + y if self.residual else y

    def _fused(self, kernel, x: mx.array) -> mx.array:
        """The whole block in one native pass (inference): its 6x-wide activation never leaves
        the cache. Training runs the separate steps above, each with its own gradient."""
        d = self.depthwise
        expand = () if self.expand is None else (self.expand.weight, self.expand.bias)
        return kernel.inverted_residual(x, d.taps(), d.bias, self.project.weight, self.project.bias, d.stride,
                                        [*d.pads, *d.pads], *expand)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0). Input: NHWC float pixels in [0, 255]."""

    def __init__(self, spec: ModelSpec = ModelSpec()):
        super().__init__()
        self.spec = spec
        mean, std = NORMALIZATIONS[spec.normalization]
        # Leading underscore: constants, not parameters. Equal per-channel values (inception)
        # stay Python scalars, which keeps MLX's CPU elementwise kernels on their fast path.
        uniform = len(set(mean)) == 1 and len(set(std)) == 1
        self._mean = mean[0] if uniform else mx.array(mean)
        self._inv_std = 1.0 / std[0] if uniform else 1.0 / mx.array(std)
        cin = 32
        self.features = [Conv3x3(3, cin, 2, spec.padding)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                self.features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, spec.padding))
                cin = c
        self.features.append(Pointwise(cin, FEATURE_DIM, relu6=True))
        self.classifier = nn.Linear(FEATURE_DIM, spec.num_classes)

    def backbone(self, x: mx.array, start: int = 0, stop: int | None = None) -> mx.array:
        """Run ``features[start:stop]``; normalization is applied when start == 0."""
        if start == 0:
            x = (x - self._mean) * self._inv_std
        for layer in self.features[start:stop]:
            x = layer(x)
        return x

    def embed(self, x: mx.array) -> mx.array:
        """Globally pooled 1280-d features."""
        return self.features[-1].pooled(self.backbone(x, 0, -1))

    def __call__(self, x: mx.array) -> mx.array:
        return self.classifier(self.embed(x))
