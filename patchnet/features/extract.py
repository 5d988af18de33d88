"""Patch features from a frozen trunk: exact mode (every patch through the trunk) and shared mode.

A third mode, ``whole``, is the "CNN features off-the-shelf" baseline: one pass on the whole image
and one on its mirror image, each pooled over the whole map, as two "patches" of the image.

Both modes rescale the image once per scale by ``input_size / side``, so that a patch of that scale
becomes exactly ``input_size`` pixels. Which patches an image has and how each is computed is its
``PatchPlan`` (``patchnet.patches.grid``), made once per image and returned with its features.
- exact: each patch is a slice of the rescaled image, and slices run through the whole network
  in batches (the paper's method, without per-patch resampling).
- shared: the trunk runs once on each rescaled image, and each patch's region of the feature map is
  pooled with RoIAlign (the convolutions see context outside the patch). With
  ``patches.exact_up_to``, the coarse scales (few, large patches) are cropped as in exact mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone, BackboneError, backbone_spec, build_backbone, check_patch_mode
from ..backbones.lite import EfficientNetLiteTrunk
from ..backbones.quantize import MULTIPLE, Int8Ranges, Int8Trunk, calibrate_int8, int8_trunk
from ..dist import resolve_device, resolve_precision
from ..files import digest
from ..patches.grid import Level, PatchPlan, ScaleGrid, patch_plan
from ..recipe import BackboneConfig, PatchConfig, Recipe
from ..threads import tick, use_threads


def build_extractor(recipe: Recipe, backbone: Backbone | None = None) -> PatchExtractor:
    """The recipe's frozen backbone and patch settings, on its device (under torchrun: this rank's GPU).

    ``backbone``: the recipe's backbone already built (with trained stages loaded, for instance).
    """
    b = recipe.backbone
    use_threads(recipe.runtime.threads)
    backbone = backbone or build_backbone(b.name, b.weights, b.input_size, b.layer)
    return PatchExtractor(backbone, recipe.patches, b, recipe.runtime.device, recipe.runtime.trunk_batch)


def map_cells(backbone: Backbone, boxes: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
    """Boxes (N, 4) in pixels of an image -> cells of the map of that image rescaled by ``fx`` x ``fy``.

    x' = (x * fx - offset) / stride, per axis (the rescaled size was rounded, so fx and fy differ a little).
    """
    scale = torch.tensor([fx, fy, fx, fy], device=boxes.device) / backbone.stride
    return boxes * scale - backbone.offset / backbone.stride


class PatchExtractor:
    """Computes the features of all patches of an image, in the order of its ``PatchPlan``."""

    def __init__(
        self,
        backbone: Backbone,
        patches: PatchConfig,
        backbone_cfg: BackboneConfig | None = None,
        device: str = "auto",
        batch_size: int = 0,
        fuse: bool = True,
    ):
        cfg = backbone_cfg or BackboneConfig()
        check_patch_mode(backbone_spec(backbone.name), patches.mode, backbone.input_size)
        self.patches = patches
        self.device = resolve_device(device)
        self.int8 = cfg.precision == "int8"
        if self.int8 and (self.device.type != "cpu" or not isinstance(backbone.trunk, EfficientNetLiteTrunk)):
            raise BackboneError(
                f"backbone.precision=int8 runs an EfficientNet-Lite trunk on the CPU; got {backbone.name} on "
                f"{self.device}; use backbone.precision=auto"
            )
        self.autocast_dtype = None if self.int8 else resolve_precision(cfg.precision, self.device)
        self.channels_last = cfg.channels_last
        self.batch_size = batch_size or (128 if self.device.type == "cuda" else 16)
        self.backbone = (backbone.fused() if fuse or self.int8 else backbone).to(self.device)
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.size = backbone.input_size
        self.float_trunk = self.backbone.trunk
        self.int8_ranges: Int8Ranges | None = None  # set by calibrate or use_int8
        self.multiple = MULTIPLE if self.int8 else 1  # shared and whole modes rescale to sizes of this multiple

    @property
    def precision_id(self) -> str:
        """The trunk's arithmetic, for cache keys: fp32, an autocast dtype, or int8 with its weight bits and ranges."""
        if not self.int8:
            return str(self.autocast_dtype or "fp32")
        self.require_calibration()
        return f"int8-w{cast(Int8Trunk, self.backbone.trunk).weight_bits}-{digest(self.int8_ranges)}"

    def require_calibration(self) -> None:
        """Refuse an int8 trunk without activation ranges, naming the fix."""
        if self.int8 and self.int8_ranges is None:
            raise BackboneError(
                "backbone.precision=int8: the trunk is not calibrated yet (training calibrates it on the training "
                "split, and its checkpoint carries the ranges); call calibrate or use_int8 first"
            )

    def use_int8(self, ranges: Int8Ranges) -> None:
        """Run the int8 trunk with these activation ranges (``calibrate``'s, or a checkpoint's)."""
        self.backbone.trunk = int8_trunk(cast(EfficientNetLiteTrunk, self.float_trunk), ranges)
        self.int8_ranges = ranges

    def calibrate(self, images) -> Int8Ranges:
        """Calibrate the int8 trunk on the pyramid levels of ``images`` (uint8 (H, W, 3) arrays) and run it."""
        inputs = (x for image in images for x in self.level_inputs(image))
        with torch.inference_mode():
            ranges = calibrate_int8(cast(EfficientNetLiteTrunk, self.float_trunk), inputs)
        self.use_int8(ranges)
        return ranges

    def level_inputs(self, image) -> list[torch.Tensor]:
        """The normalised trunk inputs of an image in shared mode: one per pyramid level."""
        img = self.prepare(image)
        b = self.backbone
        return [(x - b.mean) / b.std for _, x in self.level_images(img, self.plan(img.shape[-1], img.shape[-2]))]

    def level_images(self, img: torch.Tensor, plan: PatchPlan) -> Iterator[tuple[Level, torch.Tensor]]:
        """Each pyramid level of ``plan`` with the prepared ``img`` rescaled for it, as shared mode runs the trunk."""
        for level in plan.levels:
            yield level, self.rescale(img, level.factor, self.multiple)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def plan(self, width: int, height: int) -> PatchPlan:
        """The patches of a width x height image and how each is computed."""
        return patch_plan(width, height, self.patches, self.size)

    def boxes(self, width: int, height: int) -> np.ndarray:
        return self.plan(width, height).boxes

    def autocast(self):
        """The trunk's autocast context (``backbone.precision``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, image) -> torch.Tensor:
        """uint8 (H, W, 3) array or (3, H, W) tensor -> float (1, 3, H, W) in [0, 1] on the device."""
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return image.to(self.device, non_blocking=True).unsqueeze(0).float().div_(255)

    def rescale(self, img: torch.Tensor, factor: float, multiple: int = 1) -> torch.Tensor:
        """``img`` rescaled by ``factor``, its sides rounded to a ``multiple``."""
        size = tuple(max(multiple, round(side * factor / multiple) * multiple) for side in img.shape[-2:])
        out = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __call__(self, image) -> torch.Tensor:
        """(N, d) float32 features of all patches, on the CPU."""
        return self.extract(image)[0]

    @torch.inference_mode()
    def extract(self, image, keep_maps: list | None = None) -> tuple[torch.Tensor, PatchPlan]:
        """(N, d) float32 features of all patches of an image, on the CPU, and the plan they follow.

        ``keep_maps``: a list to append each pyramid level's trunk map to, as the detection head reads it
        (``((h, w, d) float16 array, (x, y) rescaling)``), so that the trunk runs once for both; left empty
        where the levels are rescaled otherwise than the detection head's maps (sides rounded to a multiple)."""
        self.require_calibration()
        tick()  # another process may have started: spinning threads give way (threads.py)
        img = self.prepare(image)
        h, w = img.shape[-2:]
        plan = self.plan(w, h)
        if plan.mode == "whole":
            return torch.cat([self._whole(img), self._whole(img.flip(-1))]).float().cpu(), plan
        feats: list[torch.Tensor | None] = [
            self._exact(img, g) if i in plan.cropped else None for i, g in enumerate(plan.grids)
        ]
        keep = keep_maps if self.multiple == 1 else None
        for level, scaled in self.level_images(img, plan):
            grids = [plan.grids[i] for i in level.grids]
            for i, f in zip(level.grids, self._shared_level(scaled, grids, w, h, keep)):
                feats[i] = f
        return torch.cat(cast(list[torch.Tensor], feats)).float().cpu(), plan  # every grid is filled

    def _exact(self, img: torch.Tensor, grid: ScaleGrid) -> torch.Tensor:
        factor = self.size / grid.side
        scaled = self.rescale(img, factor)
        sh, sw = scaled.shape[-2:]
        xs = np.clip(np.round(grid.boxes[:, 0] * factor).astype(int), 0, max(sw - self.size, 0))
        ys = np.clip(np.round(grid.boxes[:, 1] * factor).astype(int), 0, max(sh - self.size, 0))
        out = []
        for start in range(0, len(xs), self.batch_size):
            crops = [
                scaled[0, :, y : y + self.size, x : x + self.size]
                for x, y in zip(xs[start : start + self.batch_size], ys[start : start + self.batch_size])
            ]
            batch = torch.stack(crops)
            if batch.shape[-1] != self.size or batch.shape[-2] != self.size:  # an image smaller than a patch
                batch = F.interpolate(batch, size=(self.size, self.size), mode="bilinear", align_corners=False)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                out.append(self.backbone(batch).float())
        return torch.cat(out)

    def whole_factor(self, width: int, height: int) -> float:
        """The rescaling of whole mode: the short side to the input size, the long one at most ``max_side``."""
        factor = self.size / min(width, height)
        return factor * min(1.0, self.patches.max_side / (max(width, height) * factor))

    def _whole(self, img: torch.Tensor) -> torch.Tensor:
        """One trunk pass on the whole image, short side at the input size, pooled over the whole map."""
        h, w = img.shape[-2:]
        with self.autocast():
            fmap = self.backbone.feature_map(self.rescale(img, self.whole_factor(w, h), self.multiple))
            cells = torch.tensor([[0.0, 0.0, fmap.shape[-1], fmap.shape[-2]]], device=self.device)
            return self.backbone.pool_regions(fmap, cells).float()

    def _shared_level(
        self, scaled: torch.Tensor, grids: list[ScaleGrid], width: int, height: int, keep: list | None = None
    ) -> list[torch.Tensor]:
        """Features of ``grids`` (boxes in pixels of the width x height image) pooled from one trunk pass (its map
        appended to ``keep``, see ``extract``)."""
        with self.autocast():
            fmap = self.backbone.feature_map(scaled)
        if keep is not None:
            factors = (scaled.shape[-1] / width, scaled.shape[-2] / height)
            keep.append((fmap[0].permute(1, 2, 0).to(torch.float16).cpu().numpy(), factors))
        boxes = torch.from_numpy(np.concatenate([g.boxes for g in grids])).to(self.device, torch.float32)
        cells = map_cells(self.backbone, boxes, scaled.shape[-1] / width, scaled.shape[-2] / height)
        with self.autocast():
            feats = self.backbone.pool_regions(fmap, cells).float()
        return list(torch.split(feats, [len(g.boxes) for g in grids]))
