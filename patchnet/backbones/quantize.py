"""An int8 EfficientNet-Lite trunk for CPUs (``backbone.precision: int8``): post-training static quantisation in
PyTorch's eager mode, run by oneDNN's int8 kernels.

Weights are per-channel symmetric int8, quantised from the fp32 weights whenever the trunk is built; activations
are per-tensor uint8 with ranges from a calibration on training images (``calibrate_int8``: histogram observers,
ReLU6 outputs capped at 6 where ReLU6 saturates). The ranges are plain numbers (``Int8Ranges``) kept in the
checkpoint, so ``int8_trunk`` rebuilds the same trunk anywhere. TensorFlow "same" padding becomes static: the
input is padded to a multiple of 32 (the extractor already rescales to one), so every stride-2 layer sees even
sizes, whose asymmetric padding is a symmetric one with a zero tap in front of the kernel.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import cast

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

from .lite import EfficientNetLiteTrunk, MBConv
from .spec import BackboneError

Int8Ranges = dict[str, list[float]]  # module name -> [scale, zero_point] of its uint8 output
ENGINE = "onednn"  # fbgemm's (x86) depthwise kernels ran this trunk 20x slower than fp32
MULTIPLE = 32  # the trunk's stride: inputs of this multiple give every stride-2 layer even sizes


def weight_bits() -> int:
    """8 on CPUs with VNNI; 7 elsewhere, where AVX2's u8 x s8 pair sums saturate at 16 bits with 8-bit weights."""
    return 8 if torch.cpu._is_vnni_supported() else 7


def _static_conv(conv: nn.Conv2d, same: bool) -> nn.Conv2d:
    """A copy of a fused convolution whose "same" padding (for even inputs) is the convolution's own."""
    k, s = conv.kernel_size[0], conv.stride[0]
    weight = conv.weight.detach()
    pad = 0
    if same and s == 1:
        pad = (k - 1) // 2
    elif same:  # an even input pads (p // 2, p - p // 2) with p = k - s: one more on both sides, a zero tap first
        pad, k = (k - s + 1) // 2, k + 1
        weight = F.pad(weight, [1, 0, 1, 0])
    out = nn.Conv2d(conv.in_channels, conv.out_channels, k, s, pad, groups=conv.groups, bias=True)
    out.weight.data.copy_(weight)
    cast(torch.Tensor, out.bias).data.copy_(cast(torch.Tensor, conv.bias).detach())  # fused: BatchNorm's bias
    return out


def _conv_relu6(conv: nn.Conv2d, same: bool = False) -> nn.Module:
    # a ReLU: the output's range, capped at 6 by calibration, saturates where ReLU6 does
    return nni.ConvReLU2d(_static_conv(conv, same), nn.ReLU())


class _Block(nn.Module):
    def __init__(self, block: MBConv):
        super().__init__()
        self.expand = _conv_relu6(block._expand_conv) if block.has_expand else None
        self.depthwise = _conv_relu6(block._depthwise_conv, same=True)
        self.project = _static_conv(block._project_conv, same=False)
        self.add = nn.quantized.FloatFunctional() if block.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return self.add.add(x, y) if self.add is not None else y


class Int8Trunk(nn.Module):
    """A fused Lite trunk's layers, ready for quantisation: normalised (B, 3, H, W) floats in, the float map out."""

    weight_bits = 8  # of the weights, once ``int8_trunk`` has quantised them

    def __init__(self, trunk: EfficientNetLiteTrunk):
        super().__init__()
        if not isinstance(trunk._bn0, nn.Identity):
            raise BackboneError("an int8 trunk is built from a fused trunk (BatchNorm folded: Backbone.fused())")
        self.quant = tq.QuantStub()
        self.stem = _conv_relu6(trunk._conv_stem, same=True)
        self.blocks = nn.ModuleList(_Block(cast(MBConv, b)) for b in trunk._blocks)
        self.head = _conv_relu6(trunk._conv_head)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, [0, -w % MULTIPLE, 0, -h % MULTIPLE])  # zeros: the mean colour, as "same" padding pads
        x = self.quant(x).contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.dequant(self.head(x))[..., : -(-h // MULTIPLE), : -(-w // MULTIPLE)]


class _ReLU6Histogram(tq.HistogramObserver):
    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        super().forward(x_orig.clamp(max=6.0))
        return x_orig


def int8_available() -> bool:
    """Whether this build of PyTorch has the quantised engine the int8 trunk runs on."""
    return ENGINE in torch.backends.quantized.supported_engines


def _check_engine() -> None:
    if not int8_available():
        raise BackboneError(
            f"backbone.precision=int8 needs PyTorch's {ENGINE} quantised engine (x86 CPUs); this build has "
            f"{', '.join(torch.backends.quantized.supported_engines)}; use backbone.precision=fp32 or bf16"
        )
    torch.backends.quantized.engine = ENGINE  # the kernels are chosen at conversion and at run time


def _weight_observer(bits: int):
    top = 2 ** (bits - 1) - 1
    return tq.PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-top, quant_max=top
    )


def _observed(model: Int8Trunk) -> dict[str, nn.Module]:
    """The modules whose outputs are quantised, by name."""
    out = {"quant": model.quant, "stem": model.stem, "head": model.head}
    for i, block in enumerate(model.blocks):
        for part in ("expand", "depthwise", "project", "add"):
            if getattr(block, part) is not None:
                out[f"blocks.{i}.{part}"] = getattr(block, part)
    return out


@contextlib.contextmanager
def _quiet():
    """Silences torch.ao's notices that eager quantisation will move to torchao (it runs in the pinned torch)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per", UserWarning)
        yield


def _prepare(model: Int8Trunk, qconfigs: dict[str, tq.QConfig]) -> None:
    for name, m in _observed(model).items():
        m.qconfig = qconfigs[name]  # type: ignore[assignment]
    model.dequant.qconfig = qconfigs["head"]
    tq.prepare(model, inplace=True)


@torch.inference_mode()
def calibrate_int8(trunk: EfficientNetLiteTrunk, inputs: Iterable[torch.Tensor]) -> Int8Ranges:
    """The activation ranges of ``trunk`` (fused) on ``inputs``: normalised (1, 3, H, W) images."""
    model = Int8Trunk(trunk).eval()
    qconfigs = {}
    for name, m in _observed(model).items():
        act = (_ReLU6Histogram if isinstance(m, nni.ConvReLU2d) else tq.HistogramObserver).with_args(reduce_range=False)
        qconfigs[name] = tq.QConfig(activation=act, weight=_weight_observer(8))
    seen = 0
    with _quiet():
        _prepare(model, qconfigs)
        for x in inputs:
            model(x)
            seen += 1
    if not seen:
        raise BackboneError("int8 calibration needs at least one image")
    ranges = {}
    for name, m in _observed(model).items():
        scale, zero = cast(tq.ObserverBase, m.activation_post_process).calculate_qparams()
        ranges[name] = [float(scale), float(zero)]
    return ranges


def int8_trunk(trunk: EfficientNetLiteTrunk, ranges: Int8Ranges, bits: int | None = None) -> Int8Trunk:
    """The int8 trunk of ``trunk`` (fused) with the activation ``ranges`` of ``calibrate_int8``; ``bits``: of the
    weights (``weight_bits()`` by default)."""
    _check_engine()
    model = Int8Trunk(trunk).eval()
    observed = _observed(model)
    if set(ranges) != set(observed):
        raise BackboneError(
            f"the int8 ranges name {len(ranges)} modules, the trunk quantises {len(observed)}: they come from "
            "another backbone; calibrate again (retrain, or use backbone.precision=fp32 or bf16)"
        )
    model.weight_bits = bits or weight_bits()
    weights = _weight_observer(model.weight_bits)
    qconfigs = {}
    for name, (scale, zero) in ranges.items():
        act = tq.FixedQParamsObserver.with_args(scale=scale, zero_point=int(zero))
        qconfigs[name] = tq.QConfig(activation=act, weight=weights)
    with _quiet():
        _prepare(model, qconfigs)
        tq.convert(model, inplace=True)
    return model
