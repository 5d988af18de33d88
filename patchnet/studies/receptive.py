"""Receptive fields of a trunk's stages, from its own convolutions and poolings (``trunk_layers``): size and
stride exactly, the position of unit 0 from each layer's left padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..backbones import Backbone, Conv2dSame, Stage, backbone_spec


@dataclass(frozen=True)
class ReceptiveField:
    """Along one axis: the input pixels one unit sees, the pixels between units, the centre of unit 0.

    Pixel i spans [i, i + 1], so the first pixel's centre is 0.5.
    """

    size: float
    stride: float
    start: float

    def centre(self, index: int | np.ndarray) -> float | np.ndarray:
        return self.start + index * self.stride


def receptive_field(layers: list[tuple[int, int, int, int]]) -> ReceptiveField:
    """The receptive field of a chain of layers, each (kernel, stride, left padding, dilation)."""
    size, stride, start = 1.0, 1.0, 0.5
    for kernel, s, pad, dilation in layers:
        span = dilation * (kernel - 1) + 1
        size += (span - 1) * stride
        start += ((span - 1) / 2 - pad) * stride
        stride *= s
    return ReceptiveField(size, stride, start)


def _first(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _geometry(m: nn.Module) -> tuple[int, int, int, int] | None:
    """(kernel, stride, left padding, dilation) of a convolution or pooling layer; None for any other module."""
    if isinstance(m, Conv2dSame):  # TF "same": the left padding of an input divisible by the stride
        k, s = m.weight.shape[-1], _first(m.stride)
        return k, s, max(k - s, 0) // 2, _first(m.dilation)
    if isinstance(m, nn.Conv2d):
        k, d = _first(m.kernel_size), _first(m.dilation)
        pad = d * (k - 1) // 2 if m.padding == "same" else _first(m.padding)
        return k, _first(m.stride), pad, d
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return (
            _first(m.kernel_size),
            _first(m.stride or m.kernel_size),
            _first(m.padding),
            _first(getattr(m, "dilation", 1)),
        )
    return None


def trunk_layers(
    trunk: nn.Module, module: str = "", shortcuts: tuple[str, ...] = ()
) -> list[tuple[int, int, int, int]]:
    """Geometry of the convolutions and poolings from the input to the output of ``module`` ("" = all).

    Modules are taken in registration order, which is the order of the forward pass on the main path
    of these trunks; modules named in ``shortcuts`` (ResNet's ``downsample``) run beside it and are left out.
    """
    out, entered = [], False
    for name, m in trunk.named_modules():
        inside = not module or name == module or name.startswith(module + ".")
        if entered and not inside:
            break
        entered = entered or (inside and bool(module))
        if shortcuts and set(name.split(".")) & set(shortcuts):
            continue
        layer = _geometry(m)
        if layer is not None:
            out.append(layer)
    return out


def stage_receptive_field(backbone: Backbone, stage: Stage) -> ReceptiveField:
    """The receptive field of one cell of a stage's map (FC stages: of the trunk's output they read)."""
    return receptive_field(trunk_layers(backbone.trunk, stage.module, backbone_spec(backbone.name).shortcuts))
