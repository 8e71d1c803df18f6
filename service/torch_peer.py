"""The same MobileNetV2, with the same (folded) weights, in PyTorch: the peer for ``watchtrain bench``.

Only imported when PyTorch is installed (the optional ``bench`` extra); never at runtime.
Built from the MLX model's parameters, so both compute the same function and the
benchmark can check that before it compares speed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten

from service.mobilenet import NORMALIZATIONS, MobileNetV2, pads_for


class TorchMobileNetV2(torch.nn.Module):
    """NCHW float pixels in [0, 255] -> logits, or pooled features with ``embed``."""

    def __init__(self, model: MobileNetV2):
        super().__init__()
        p = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}
        self.padding = model.spec.padding
        mean, std = NORMALIZATIONS[model.spec.normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, 3, 1, 1))
        self.params = torch.nn.ParameterDict()
        for key, value in p.items():
            if value.ndim == 4:  # OHWI -> OIHW
                value = value.permute(0, 3, 1, 2)
            elif value.ndim == 2 and key.startswith("features"):  # 1x1 conv as [out, in]
                value = value[:, :, None, None]
            self.params[key.replace(".", "_")] = torch.nn.Parameter(value.contiguous())
        self.layout = [
            (i, layer.expand is not None, layer.depthwise.stride, layer.residual)
            for i, layer in enumerate(model.features[1:-1], start=1)
        ]
        self.n_features = len(model.features)

    def _w(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params[f"{name}_weight"], self.params[f"{name}_bias"]

    def _conv3x3(self, x: torch.Tensor, name: str, stride: int, groups: int) -> torch.Tensor:
        before, after = pads_for(stride, self.padding)
        w, b = self._w(name)
        if before == after:  # what a PyTorch user writes; only TF-SAME's asymmetric pad needs F.pad
            return F.relu6(F.conv2d(x, w, b, stride=stride, padding=before, groups=groups))
        x = F.pad(x, (before, after, before, after))
        return F.relu6(F.conv2d(x, w, b, stride=stride, groups=groups))

    def backbone(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.n_features if stop is None else stop
        if start == 0:
            x = (x - self.mean) * self.inv_std
            x = self._conv3x3(x, "features_0", 2, 1)
        for i, expand, stride, residual in self.layout:
            if not start <= i < stop:
                continue
            y = F.relu6(F.conv2d(x, *self._w(f"features_{i}_expand"))) if expand else x
            y = self._conv3x3(y, f"features_{i}_depthwise", stride, y.shape[1])
            y = F.conv2d(y, *self._w(f"features_{i}_project"))
            x = x + y if residual else y
        if start <= self.n_features - 1 < stop:
            x = F.relu6(F.conv2d(x, *self._w(f"features_{self.n_features - 1}")))
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._w("classifier")
        return F.linear(self.embed(x), w, b)
