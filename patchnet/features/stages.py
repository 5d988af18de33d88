"""One vector per stage of a frozen trunk for each image of a split, from one trunk pass, cached on disk (a
``patchnet.store`` folder under ``<cache_dir>/layers/``: one row file per stage, one row per readable image).

The per-layer study (``patchnet.studies.layers``) fits linear classifiers on these vectors; the unit views
(``patchnet.studies.units``) read the stage maps themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, build_backbone
from ..data import Dataset
from ..dist import is_main
from ..errors import PatchnetError
from ..recipe import Recipe
from ..store import CacheSpec, ItemIndex, fill_chunks, join_chunks, keyed_folder, memmap, open_or_build, row_file
from ..studies.linear import SplitFeatures, whole_image_recipe
from .build import cache_fields
from .extract import PatchExtractor

log = logging.getLogger("patchnet")

LAYERS_VERSION = 2  # bump whenever what a stage vector holds, or how it is stored, changes (2: store folders)
POOLS = ("whole", "max")


class StageExtractor(PatchExtractor):
    """One vector per stage of the backbone for an image, from one trunk pass (per image and mirror, or per level).

    The trunk stays unfused: stage maps are caught by forward hooks, which an FX-fused trunk lacks.
    """

    def __init__(self, backbone: Backbone, recipe: Recipe):
        super().__init__(
            backbone, recipe.patches, recipe.backbone, recipe.runtime.device, recipe.runtime.trunk_batch, fuse=False
        )
        self.stages = self.backbone.stages

    def whole_maps(self, img: torch.Tensor, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], tuple]:
        """Stage maps of a (1, 3, H, W) image rescaled as in whole mode, and (fx, fy): input pixels per image pixel."""
        h, w = img.shape[-2:]
        scaled = self.rescale(img, self.whole_factor(w, h))
        with self.autocast():
            maps = self.backbone.stage_maps(scaled, names)
        return maps, (scaled.shape[-1] / w, scaled.shape[-2] / h)

    @torch.inference_mode()
    def image_maps(self, image, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], tuple]:
        """``whole_maps`` of a uint8 (H, W, 3) array or (3, H, W) tensor."""
        return self.whole_maps(self.prepare(image), names)

    @torch.inference_mode()
    def __call__(self, image) -> dict[str, torch.Tensor]:  # type: ignore[override]  # a vector per stage, by design
        """{stage: (dim,) float32 vector on the CPU} of a uint8 (H, W, 3) array or (3, H, W) tensor."""
        img = self.prepare(image)
        if self.patches.mode == "whole":
            a, b = self._whole_vectors(img), self._whole_vectors(img.flip(-1))
            return {k: ((a[k] + b[k]) / 2).cpu() for k in a}
        return {k: v.cpu() for k, v in self._max_vectors(img).items()}

    def _whole_vectors(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        maps, _ = self.whole_maps(img)
        out = {}
        with self.autocast():
            for s in self.stages:
                m = maps[s.name]
                cells = torch.tensor([[0.0, 0.0, m.shape[-1], m.shape[-2]]], device=self.device)
                out[s.name] = self.backbone.pool_stage(s, m, cells)[0].float()
        return out

    def _max_vectors(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stage's mean over every patch (shared mode, per pyramid level), max-pooled over the patches."""
        h, w = img.shape[-2:]
        plan = self.plan(w, h)
        grids = plan.grids
        best: dict[str, torch.Tensor] = {}
        for level in plan.levels:
            scaled = self.rescale(img, level.factor)
            with self.autocast():
                maps = self.backbone.stage_maps(scaled)
            fx, fy = scaled.shape[-1] / w, scaled.shape[-2] / h
            boxes = torch.from_numpy(np.concatenate([grids[i].boxes for i in level.grids])).to(
                self.device, torch.float32
            )
            boxes = boxes * torch.tensor([fx, fy, fx, fy], device=self.device)
            for s in self.stages:
                # the trunk's output carries the backbone's cell offset (AlexNet); inner maps are taken unshifted
                offset = 0.0 if s.module else self.backbone.offset
                with self.autocast():
                    v = self.backbone.pool_stage(s, maps[s.name], (boxes - offset) / s.stride).float().amax(0)
                best[s.name] = v if s.name not in best else torch.maximum(best[s.name], v)
        return best


def stage_recipe(recipe: Recipe, pool: str) -> Recipe:
    """The recipe whose patch settings give ``pool``: whole images, or shared mode over its levels."""
    if pool not in POOLS:
        raise PatchnetError(f"--features must be one of {', '.join(POOLS)}; got {pool!r}")
    if pool == "whole":
        return whole_image_recipe(recipe)
    return replace(recipe, patches=replace(recipe.patches, mode="shared", exact_up_to=0.0))


def build_stage_extractor(recipe: Recipe) -> StageExtractor:
    """The recipe's backbone with its whole head (every stage up to FC7), unfused, on the recipe's device."""
    b = recipe.backbone
    return StageExtractor(build_backbone(b.name, b.weights, b.input_size), recipe)


@dataclass
class StageFeatures:
    """One row per readable image of a split for every stage, with image-level labels."""

    ids: list[str]
    labels: np.ndarray  # (N, C) int8
    classes: list[str]
    features: dict[str, np.ndarray]  # stage -> (N, dim) float32

    def split(self, stage: str) -> SplitFeatures:
        return SplitFeatures(self.ids, self.features[stage], self.labels, self.classes)


def stage_cache_key(recipe: Recipe, dataset: Dataset, extractor: StageExtractor) -> tuple[Path, dict]:
    """The cache folder of a split's stage vectors and its key's fields: the feature cache's, and the stages."""
    fields = {
        **cache_fields(dataset, extractor),
        "study": "layers",
        "layers_version": LAYERS_VERSION,
        "stages": [(s.name, s.module, s.head) for s in extractor.stages],
    }
    return keyed_folder(Path(recipe.runtime.cache_dir), fields, "layers"), fields


F32 = np.dtype(np.float32)


def stage_features(recipe: Recipe, dataset: Dataset, extractor: StageExtractor, progress: bool = True) -> StageFeatures:
    """The stage vectors of a split, from the cache or computed there first."""
    path, fields = stage_cache_key(recipe, dataset, extractor)
    index = open_or_build(
        path,
        "stage cache",
        lambda: _compute_stage_features(recipe, dataset, extractor, path, fields, progress),
        ItemIndex,
    )
    records = np.flatnonzero(index.ok)  # one item per record (no views); an unreadable image has no row
    features = {
        name: np.array(memmap(path, row_file(name, F32), F32, (len(records), dim)))
        for name, dim in index.meta["stages"].items()
    }
    return StageFeatures(
        [dataset.records[r].image_id for r in records], dataset.labels()[records], list(dataset.classes), features
    )


def _compute_stage_features(
    recipe: Recipe, dataset: Dataset, extractor: StageExtractor, path: Path, fields: dict, progress: bool
) -> None:
    spec = CacheSpec(path.parent, max(1, recipe.cache.chunk), recipe.runtime.workers)
    layout = {s.name: (F32, s.dim) for s in extractor.stages}

    def compute(image: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
        h, w = image.shape[-2:]  # the item's one row describes the whole image
        return {k: v.numpy()[None] for k, v in extractor(image).items()}, np.array([[0, 0, w, h]], np.float32)

    def pack(payloads: list) -> dict[str, np.ndarray]:
        done = [p for p in payloads if p is not None]
        return {
            name: np.concatenate([p[name] for p in done]) if done else np.zeros((0, dim), F32)
            for name, (_, dim) in layout.items()
        }

    meta = {"fields": fields, "feature_dim": extractor.feature_dim, "stages": {s.name: s.dim for s in extractor.stages}}
    desc = f"stages {dataset.name.rsplit(':', 1)[-1]}"
    num_chunks = fill_chunks(path, meta, dataset, 0, spec, extractor.device, compute, pack, desc, progress)
    if is_main():
        join_chunks(path, num_chunks, layout, "stage cache")
