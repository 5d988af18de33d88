"""Patch features from a frozen trunk: exact mode (every patch through the trunk) and shared mode.

A third mode, ``whole``, is the "CNN features off-the-shelf" baseline: one pass on the whole image
and one on its mirror image, each pooled over the whole map, as two "patches" of the image.

Both modes rescale the image once per scale by ``input_size / side``, so that a patch of that scale
becomes exactly ``input_size`` pixels.
- exact: each patch is a slice of the rescaled image, and slices run through the whole network
  in batches (the paper's method, without per-patch resampling).
- shared: the trunk runs once on each rescaled image, and each patch's region of the feature map is
  pooled with RoIAlign (the convolutions see context outside the patch). With
  ``patches.exact_up_to``, the coarse scales (few, large patches) are cropped as in exact mode.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, Unlock, backbone_spec, build_backbone, check_patch_mode, region_weights
from .recipe import BackboneConfig, PatchConfig, Recipe
from .sampler import ScaleGrid, grid_by_scale


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available; use runtime.device=cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: fp16 on CUDA, bf16 on CPUs with native bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None


def build_extractor(recipe: Recipe, backbone: Backbone | None = None) -> "PatchExtractor":
    """The recipe's frozen backbone and patch settings, on its device (under torchrun: this rank's GPU).

    ``backbone``: the recipe's backbone already built (with trained stages loaded, for instance).
    """
    import torch.distributed as dist

    b, device = recipe.backbone, recipe.runtime.device
    if device == "auto" and torch.cuda.is_available() and dist.is_available() and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    backbone = backbone or build_backbone(b.name, b.weights, b.input_size, b.layer)
    return PatchExtractor(backbone, recipe.patches, b, device, recipe.runtime.trunk_batch)


def map_cells(backbone: Backbone, boxes: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
    """Boxes (N, 4) in pixels of an image -> cells of the map of that image rescaled by ``fx`` x ``fy``.

    x' = (x * fx - offset) / stride, per axis (the rescaled size was rounded, so fx and fy differ a little).
    """
    scale = torch.tensor([fx, fy, fx, fy], device=boxes.device) / backbone.stride
    return boxes * scale - backbone.offset / backbone.stride


@dataclass
class ImageMaps:
    """Shared mode stopped at the boundary below the unlocked stages (``train.unlock``) for one image."""

    maps: list[np.ndarray]  # (h, w, C) float16 boundary map of each level
    factors: np.ndarray  # (L, 2) x and y rescaling of the image at each level
    boxes: np.ndarray  # (P, 4) patches in image pixels, in the order of ``patch_grid``
    level: np.ndarray  # (P,) the level each patch is pooled from

    def subset(self, rows: np.ndarray) -> "ImageMaps":
        """The same maps with only the patches ``rows``."""
        return ImageMaps(self.maps, self.factors, self.boxes[rows], self.level[rows])


class UnlockedStages(nn.Module):
    """The last stages of a backbone trained on its cached boundary maps (``train.unlock``).

    Each level's map runs through the stages, and each patch's region of the result is averaged as in
    shared mode (``region_weights``: a matrix product, quick to differentiate), then goes through the
    backbone's head (Lite's is the identity; no ``roi_size``). BatchNorm stays in eval mode (the
    backbone's ``train`` keeps it there), so its statistics never move; its affine weights train with
    the convolutions.
    """

    def __init__(self, backbone: Backbone, unlock: Unlock):
        super().__init__()
        self.backbone, self.unlock = backbone, unlock
        for name, p in backbone.trunk.named_parameters():
            p.requires_grad_(name.startswith(unlock.prefixes))

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.backbone.trunk.named_parameters() if p.requires_grad]

    def state(self) -> dict[str, torch.Tensor]:
        return self.backbone.unlocked_state(self.unlock)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.trunk.load_state_dict(state, strict=False)

    def forward(self, items: list[ImageMaps]) -> torch.Tensor:
        """(P, d) features of the patches of ``items``, one image after another."""
        device = self.backbone.mean.device
        out = []
        for item in items:
            parts, order = [], []
            for lv in np.unique(item.level):  # the levels that pool patches
                rows = np.flatnonzero(item.level == lv)
                x = torch.from_numpy(np.array(item.maps[lv])).to(device, non_blocking=True).float()
                fmap = self.backbone.trunk.run(x.permute(2, 0, 1)[None], self.unlock.part)  # a channels-last view
                boxes = torch.from_numpy(np.asarray(item.boxes[rows], np.float32)).to(device)
                cells = map_cells(self.backbone, boxes, float(item.factors[lv, 0]), float(item.factors[lv, 1]))
                pooled = region_weights(cells, *fmap.shape[-2:]) @ fmap[0].flatten(1).T  # (N, h w) @ (h w, C)
                parts.append(self.backbone.head(pooled))
                order.append(rows)
            if parts:
                back = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable")).to(device)
                out.append(torch.cat(parts)[back])
        return torch.cat(out) if out else torch.zeros(0, self.backbone.feature_dim, device=device)


@dataclass
class Level:
    """One trunk pass of shared mode: the image rescaled by ``factor``, and the scales pooled from it."""

    factor: float
    grids: list[int]  # indices into the image's scale grids


class PatchExtractor:
    """Computes the features of all patches of an image, in the order of ``patch_grid``."""

    def __init__(self, backbone: Backbone, patches: PatchConfig, backbone_cfg: BackboneConfig | None = None,
                 device: str = "auto", batch_size: int = 0, fuse: bool = True):
        cfg = backbone_cfg or BackboneConfig()
        check_patch_mode(backbone_spec(backbone.name), patches.mode, backbone.input_size)
        self.patches = patches
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.channels_last = cfg.channels_last
        self.batch_size = batch_size or (128 if self.device.type == "cuda" else 16)
        self.backbone = (backbone.fused() if fuse else backbone).to(self.device)
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.size = backbone.input_size

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def grids(self, width: int, height: int) -> list[ScaleGrid]:
        if self.patches.mode == "whole":  # the image and its mirror image, each as one "patch"
            whole = np.array([[0, 0, width, height]] * 2, np.float32)
            return [ScaleGrid(1.0, float(min(width, height)), whole)]
        return grid_by_scale(width, height, self.patches.scales, self.patches.step)

    def boxes(self, width: int, height: int) -> np.ndarray:
        return np.concatenate([g.boxes for g in self.grids(width, height)])

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare(self, image) -> torch.Tensor:
        """uint8 (H, W, 3) array or (3, H, W) tensor -> float (1, 3, H, W) in [0, 1] on the device."""
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return image.to(self.device, non_blocking=True).unsqueeze(0).float().div_(255)

    def _rescale(self, img: torch.Tensor, factor: float) -> torch.Tensor:
        h, w = img.shape[-2:]
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        out = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    @torch.inference_mode()
    def __call__(self, image) -> torch.Tensor:
        """(N, d) float32 features of all patches, on the CPU."""
        img = self._prepare(image)
        h, w = img.shape[-2:]
        grids = self.grids(w, h)
        if self.patches.mode == "whole":
            feats = [self._whole(img), self._whole(img.flip(-1))]
        elif self.patches.mode == "exact":
            feats = [self._exact(img, g) for g in grids]
        else:
            feats = [self._exact(img, g) if self.cropped(g.scale) else None for g in grids]
            for level in self.levels(grids, w, h):
                for i, f in zip(level.grids, self._shared(img, [grids[i] for i in level.grids], level.factor)):
                    feats[i] = f
        return torch.cat(feats).float().cpu()

    def _exact(self, img: torch.Tensor, grid: ScaleGrid) -> torch.Tensor:
        factor = self.size / grid.side
        scaled = self._rescale(img, factor)
        sh, sw = scaled.shape[-2:]
        xs = np.clip(np.round(grid.boxes[:, 0] * factor).astype(int), 0, max(sw - self.size, 0))
        ys = np.clip(np.round(grid.boxes[:, 1] * factor).astype(int), 0, max(sh - self.size, 0))
        out = []
        for start in range(0, len(xs), self.batch_size):
            crops = [scaled[0, :, y:y + self.size, x:x + self.size] for x, y in zip(xs[start:start + self.batch_size],
                                                                               ys[start:start + self.batch_size])]
            batch = torch.stack(crops)
            if batch.shape[-1] != self.size or batch.shape[-2] != self.size:  # an image smaller than a patch
                batch = F.interpolate(batch, size=(self.size, self.size), mode="bilinear", align_corners=False)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out.append(self.backbone(batch).float())
        return torch.cat(out)

    def whole_factor(self, width: int, height: int) -> float:
        """The rescaling of whole mode: the short side to the input size, the long one at most ``max_side``."""
        factor = self.size / min(width, height)
        return factor * min(1.0, self.patches.max_side / (max(width, height) * factor))

    def _whole(self, img: torch.Tensor) -> torch.Tensor:
        """One trunk pass on the whole image, short side at the input size, pooled over the whole map."""
        h, w = img.shape[-2:]
        with self._autocast():
            fmap = self.backbone.feature_map(self._rescale(img, self.whole_factor(w, h)))
            cells = torch.tensor([[0.0, 0.0, fmap.shape[-1], fmap.shape[-2]]], device=self.device)
            return self.backbone.pool_regions(fmap, cells).float()

    def cropped(self, scale: float) -> bool:
        """Whether shared mode crops this scale's patches as exact mode does (``patches.exact_up_to``)."""
        return scale <= self.patches.exact_up_to

    def levels(self, grids: list[ScaleGrid], width: int, height: int) -> list[Level]:
        """Trunk passes of shared mode; each scale is pooled from the level nearest in log-scale.

        Scales up to ``exact_up_to`` are left out: they are cropped as in exact mode.
        """
        scales = [g.scale for g in grids]
        chosen = self.patches.levels or scales
        assign: dict[float, list[int]] = {}
        for i, s in enumerate(scales):
            if self.cropped(s):
                continue
            lv = min(chosen, key=lambda v: abs(math.log(v / s)))
            assign.setdefault(lv, []).append(i)
        levels = []
        short = min(width, height)
        for lv, members in sorted(assign.items()):
            factor = self.size * lv / short
            cap = self.patches.max_side / (max(width, height) * factor)
            levels.append(Level(factor * min(1.0, cap), members))
        return levels

    def _shared(self, img: torch.Tensor, grids: list[ScaleGrid], factor: float) -> list[torch.Tensor]:
        return self._shared_level(self._rescale(img, factor), grids, img.shape[-1], img.shape[-2])

    def _shared_level(self, scaled: torch.Tensor, grids: list[ScaleGrid], width: int, height: int) -> list[torch.Tensor]:
        """Features of ``grids`` (boxes in pixels of the width x height image) pooled from one trunk pass."""
        with self._autocast():
            fmap = self.backbone.feature_map(scaled)
        boxes = torch.from_numpy(np.concatenate([g.boxes for g in grids])).to(self.device, torch.float32)
        cells = map_cells(self.backbone, boxes, scaled.shape[-1] / width, scaled.shape[-2] / height)
        with self._autocast():
            feats = self.backbone.pool_regions(fmap, cells).float()
        return list(torch.split(feats, [len(g.boxes) for g in grids]))

    @torch.inference_mode()
    def maps(self, image, part: int) -> ImageMaps:
        """Shared mode's trunk passes (whatever ``patches.mode``) stopped before trunk part ``part``
        (``train.unlock``): each level's map, and the level each patch is pooled from."""
        img = self._prepare(image)
        h, w = img.shape[-2:]
        grids = self.grids(w, h)
        starts = np.cumsum([0] + [len(g.boxes) for g in grids])
        level = np.zeros(starts[-1], np.int64)
        maps, factors = [], []
        for lv, group in enumerate(self.levels(grids, w, h)):
            scaled = self._rescale(img, group.factor)
            with self._autocast():
                fmap = self.backbone.feature_map(scaled, part)
            maps.append(fmap[0].permute(1, 2, 0).to(torch.float16).cpu().numpy())
            factors.append((scaled.shape[-1] / w, scaled.shape[-2] / h))
            for i in group.grids:
                level[starts[i]:starts[i + 1]] = lv
        boxes = np.concatenate([g.boxes for g in grids])
        return ImageMaps(maps, np.array(factors, np.float64).reshape(-1, 2), boxes, level)
