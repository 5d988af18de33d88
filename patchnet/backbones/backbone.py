"""A frozen trunk with its own preprocessing: ``trunk`` (image -> feature map) and ``head`` (pooled region -> feature).

Exact mode runs both on each patch; shared mode runs the trunk once per scale and pools each patch's
region of the map (``patchnet.backbones.regions``). ``stages`` name the trunk's depths whose maps one pass gives
(the per-layer study and the unit views).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .regions import region_mean
from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneError, Stage

if TYPE_CHECKING:
    from .lite import EfficientNetLiteTrunk
    from .timm import TimmTrunk


class Backbone(nn.Module):
    """A frozen trunk with its input size, normalisation and pooled feature size.

    Inputs are RGB float images in [0, 1]; normalisation happens inside. ``head`` turns a pooled
    region into the feature: a (N, C, roi_size, roi_size) grid when ``roi_size`` is set (AlexNet's
    and VGG's FC6/FC7), else the (N, C) mean over the region's cells.
    """

    trunk: nn.Module
    head: nn.Module
    mean: torch.Tensor  # (1, 3, 1, 1) buffers
    std: torch.Tensor

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        head: nn.Module,
        *,  # the facts by name: a dozen positional numbers read as noise and are easily swapped
        feature_dim: int,
        input_size: int,
        stride: int,
        roi_size: int = 0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_id: str = "",
        offset: float = 0.0,
        stages: tuple[Stage, ...] = (),
    ):
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

    def train(self, mode: bool = True) -> Backbone:
        # Frozen: BatchNorm statistics and dropout stay in inference mode whatever the caller asks.
        return super().train(False)

    def feature_map(self, images: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, C, ~H/stride, ~W/stride) map.

        ``stop``: only the trunk parts before it, the frozen ones of ``train.unlock`` (see ``Unlock``).
        """
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        # only a Lite trunk runs in parts (``unlock_split`` allows no other family)
        return self.trunk(x) if stop is None else cast("EfficientNetLiteTrunk", self.trunk).run(x, 0, stop)

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

    def stage(self, name: str) -> Stage:
        """The stage called ``name``, or an error that lists this backbone's stages."""
        for s in self.stages:
            if s.name == name:
                return s
        raise BackboneError(
            f"backbone {self.name} has no stage {name!r}; its stages: {', '.join(s.name for s in self.stages)}"
        )

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
                    raise BackboneError(
                        f"{self.name}: stage {s.name} names trunk module {s.module!r}, which "
                        "this trunk lacks (a fused copy? stage maps need the unfused backbone)"
                    )
                hooks.append(
                    modules[s.module].register_forward_hook(
                        lambda _m, _i, out, name=s.name: maps.__setitem__(name, out)
                    )
                )
        try:
            out = self.feature_map(images)
        finally:
            for h in hooks:
                h.remove()
        for s in stages:
            if not s.module:
                maps[s.name] = out
            elif s.name not in maps:
                raise BackboneError(
                    f"{self.name}: trunk module {s.module!r} of stage {s.name} never ran; an "
                    "FX-traced (fused) trunk has no module calls to hook: use the unfused backbone"
                )
        return {s.name: maps[s.name] for s in stages}

    def pool_stage(self, stage: Stage, fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(N, dim) vectors of regions ``cells`` (N, 4), in cell units, of a stage's (1, C, h, w) map.

        A convolutional stage gives the region's mean; a stage with a ``head`` part then applies it
        (to the RoI grid for AlexNet and VGG), as ``pool_regions`` does with the whole head.
        """
        if stage.head == 0:
            return region_mean(fmap, cells).to(fmap.dtype)
        head = self.head
        if stage.head > 0:  # the first modules of AlexNet's or VGG's FC6/FC7 head
            head = FlattenFC(cast(nn.Sequential, head.fc)[: stage.head])
        return self.pool_regions(fmap, cells, head)

    def fused(self) -> Backbone:
        """A copy for inference with BatchNorm folded into the convolutions (same outputs, faster)."""
        trunk, head = copy.deepcopy((self.trunk, self.head))  # together: a timm head uses its trunk's model
        if hasattr(trunk, "fuse"):
            cast("EfficientNetLiteTrunk | TimmTrunk", trunk).fuse()  # the trunks that have one
        else:
            try:
                from torch.fx.experimental.optimization import fuse

                trunk = fuse(trunk)
            except Exception:  # a trunk FX cannot trace stays unfused: slower, still correct
                pass
        out = Backbone(
            self.name,
            trunk,
            head,
            feature_dim=self.feature_dim,
            input_size=self.input_size,
            stride=self.stride,
            roi_size=self.roi_size,
            weights_id=self.weights_id,
            offset=self.offset,
            stages=self.stages,
        )
        out.mean, out.std = self.mean, self.std
        return out


class FlattenFC(nn.Module):
    """Flatten a fixed-size region, then the FC6/FC7 layers of AlexNet or VGG."""

    fc: nn.Module

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))
