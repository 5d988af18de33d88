"""Unlocking the last stages of the trunk (``train.unlock``): they train with the head on cached maps.

The trunk's features change at every step once its last stages train, so the cache keeps instead
each image's maps at the boundary below them (``build_maps``: shared mode's trunk passes stopped
early, stored in chunks by ``patchnet.store`` as every cache is). ``UnlockedStages``
computes the patch features from those maps, ``MapStore`` reads them as a feature store does, and
``MapsAndHead`` is the module a training step differentiates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, BackboneError, EfficientNetLiteTrunk, Unlock
from ..backbones.regions import region_weights
from ..data import Dataset
from ..dist import is_main
from ..errors import PatchnetError
from ..features.build import cache_fields
from ..features.extract import PatchExtractor, map_cells
from ..store import (
    INDEX_ARRAYS,
    CacheSpec,
    ItemIndex,
    chunk_arrays,
    chunk_rows,
    fill_chunks,
    finish_join,
    keyed_folder,
    memmap,
    open_or_build,
    write_rows,
)
from ..store.codec import FeatureCodec

MAP_VERSION = 1  # bump whenever what build_maps stores changes


def unlocked_state(backbone: Backbone, unlock: Unlock) -> dict[str, torch.Tensor]:
    """The trunk's weights and BatchNorm statistics of the unlocked stages: what a checkpoint carries."""
    return {k: v for k, v in backbone.trunk.state_dict().items() if k.startswith(unlock.prefixes)}


def load_unlocked(backbone: Backbone, state: dict[str, torch.Tensor], unlock: Unlock) -> None:
    """Load trained stages (``unlocked_state`` of a trained trunk); ``weights_id`` then names them too.

    Load before ``fused()``: the copy folds BatchNorm into the trained convolutions.
    """
    expected = unlocked_state(backbone, unlock)
    if set(state) != set(expected):
        raise BackboneError(
            f"the trained stages hold {len(state)} tensors ({sorted(state)[:2]}...), but "
            f"train.unlock={unlock.n} of {backbone.name} has {len(expected)} "
            f"({sorted(expected)[:2]}...)"
        )
    backbone.trunk.load_state_dict(state, strict=False)
    hashed = hashlib.sha256()
    for k in sorted(state):
        hashed.update(k.encode())
        hashed.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    backbone.weights_id += f"+unlock{unlock.n}:{hashed.hexdigest()[:16]}"


@dataclass
class ImageMaps:
    """Shared mode stopped at the boundary below the unlocked stages (``train.unlock``) for one image."""

    maps: list[np.ndarray]  # (h, w, C) float16 boundary map of each level
    factors: np.ndarray  # (L, 2) x and y rescaling of the image at each level
    boxes: np.ndarray  # (P, 4) patches in image pixels, in the order of the patch plan
    level: np.ndarray  # (P,) the level each patch is pooled from

    def subset(self, rows: np.ndarray) -> ImageMaps:
        """The same maps with only the patches ``rows``."""
        return ImageMaps(self.maps, self.factors, self.boxes[rows], self.level[rows])


@torch.inference_mode()
def boundary_maps(extractor: PatchExtractor, image, part: int | None) -> ImageMaps:
    """Shared mode's trunk passes stopped before trunk part ``part`` (None: the whole trunk): each level's map,
    and the level each patch is pooled from."""
    img = extractor.prepare(image)
    h, w = img.shape[-2:]
    plan = extractor.plan(w, h)
    maps, factors = [], []
    for level in plan.levels:
        scaled = extractor.rescale(img, level.factor)
        with extractor.autocast():
            fmap = extractor.backbone.feature_map(scaled, part)
        maps.append(fmap[0].permute(1, 2, 0).to(torch.float16).cpu().numpy())
        factors.append((scaled.shape[-1] / w, scaled.shape[-2] / h))
    return ImageMaps(maps, np.array(factors, np.float64).reshape(-1, 2), plan.boxes, plan.level_of_patch())


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
        return unlocked_state(self.backbone, self.unlock)

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
                trunk = cast(EfficientNetLiteTrunk, self.backbone.trunk)  # only Lite unlocks (``unlock_split``)
                fmap = trunk.run(x.permute(2, 0, 1)[None], self.unlock.part)  # a channels-last view
                boxes = torch.from_numpy(np.asarray(item.boxes[rows], np.float32)).to(device)
                cells = map_cells(self.backbone, boxes, float(item.factors[lv, 0]), float(item.factors[lv, 1]))
                pooled = region_weights(cells, *fmap.shape[-2:]) @ fmap[0].flatten(1).T  # (N, h w) @ (h w, C)
                parts.append(self.backbone.head(pooled))
                order.append(rows)
            if parts:
                back = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable")).to(device)
                out.append(torch.cat(parts)[back])
        return torch.cat(out) if out else torch.zeros(0, self.backbone.feature_dim, device=device)


class MapStore(ItemIndex):
    """A complete cache of boundary maps (``train.unlock``), opened read-only.

    Per item and level, the (h, w, C) map at the boundary below the unlocked stages, fp16 and
    memory-mapped as rows of cells (``maps``); per patch, the level it is pooled from
    (``patch_level``); the item indexes of every store. Its ``rows`` (and ``trunk_rows``, the
    same: nothing is projected) are computed on read by the unlocked stages once ``attach`` has
    given them.
    """

    level_offsets: np.ndarray  # (items + 1,) first level of each item
    level_shape: np.ndarray  # (levels, 2) each level's map size (h, w)
    level_factor: np.ndarray  # (levels, 2) network-input pixels per image pixel of each level, (x, y)
    cell_offsets: np.ndarray  # (levels + 1,) first map row (cell) of each level
    patch_level: np.ndarray  # (P,) the level each patch is pooled from
    rows: MapFeatures | None  # None until ``attach``
    trunk_rows: MapFeatures | None

    def __init__(self, path: Path):
        super().__init__(path)
        self.map_dim = self.meta["map_dim"]
        self.maps = memmap(path, "maps.f16", np.float16, (int(self.cell_offsets[-1]), self.map_dim))
        self.rows = self.trunk_rows = None

    def item_maps(self, i: int) -> ImageMaps:
        """The boundary maps of item ``i`` and its patches."""
        a, b = int(self.level_offsets[i]), int(self.level_offsets[i + 1])
        maps = [
            self.maps[self.cell_offsets[lv] : self.cell_offsets[lv + 1]].reshape(*self.level_shape[lv], self.map_dim)
            for lv in range(a, b)
        ]
        s = self.item_slice(i)
        return ImageMaps(maps, self.level_factor[a:b], self.patch_boxes[s], self.patch_level[s])

    def attach(self, stages: UnlockedStages, dtype: torch.dtype | None) -> MapStore:
        """From now on, read ``rows`` through ``stages`` as they are at the time of reading."""
        self.rows = self.trunk_rows = MapFeatures(self, stages, dtype)
        return self


class MapFeatures:
    """The (P, d) float32 patch features of a ``MapStore``, computed on read by the unlocked stages.

    Read by slices (``rows[a:b]``), as ``patchnet.head.pooling``, ``AdaptationHead.logits`` and the
    heatmaps read ``FeatureStore.rows``; the items a slice touches run whole, under autocast to
    ``dtype`` (None: fp32).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, store: MapStore, stages: UnlockedStages, dtype: torch.dtype | None):
        self.store, self.stages, self.autocast = store, stages, dtype
        self.shape = (store.num_patches, store.feature_dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        start, stop, step = index.indices(len(self)) if isinstance(index, slice) else (0, 0, 0)
        if step != 1:
            raise TypeError(f"the rows of a map store are read by slices of consecutive rows, not {index!r}")
        if stop <= start:
            return np.zeros((0, self.shape[1]), np.float32)
        offsets = self.store.offsets
        first, last = int(np.searchsorted(offsets, start, "right")) - 1, int(np.searchsorted(offsets, stop, "left"))
        device = self.stages.backbone.mean.device
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None),
        ):
            feats = self.stages([self.store.item_maps(i) for i in range(first, last)])
        base = int(offsets[first])
        return feats.float().cpu().numpy()[start - base : stop - base]


def build_maps(
    spec: CacheSpec,
    dataset: Dataset,
    extractor: PatchExtractor,
    unlock: Unlock | None,
    views: int = 0,
    progress: bool = True,
) -> MapStore:
    """Open the cached boundary maps of a split for ``train.unlock``, computing what is missing first.

    Items, chunks and resumption as in ``build_features``; the key adds the unlocked stages. ``unlock`` None:
    the trunk's last maps (the detection head's regions are pooled from them, ``train.detector``).
    """
    p = extractor.patches
    user = "train.unlock" if unlock else "train.detector"
    if p.mode != "shared" or p.exact_up_to:
        raise PatchnetError(
            f"{user} trains on the cached maps of shared mode's trunk passes, which "
            f"patches.mode={p.mode} with patches.exact_up_to={p.exact_up_to} does not make; set "
            f"patches.mode: shared and patches.exact_up_to: 0, or turn {user} off"
        )
    part, dim = (unlock.part, unlock.boundary.dim) if unlock else (None, extractor.feature_dim)
    spec = replace(spec, codec=FeatureCodec())  # maps are stored as they are
    fields = {
        **cache_fields(dataset, extractor, views, spec),
        "maps": MAP_VERSION,
        "unlock": unlock.n if unlock else 0,
        "boundary": unlock.boundary.name if unlock else "top",
    }
    path = keyed_folder(spec.root, fields)

    def build() -> None:
        meta = {"fields": fields, "feature_dim": extractor.feature_dim, "map_dim": dim}
        num_chunks = fill_chunks(
            path,
            meta,
            dataset,
            views,
            spec,
            extractor.device,
            lambda image: _with_boxes(boundary_maps(extractor, image, part)),
            lambda payloads: _pack_maps(payloads, dim),
            f"maps {dataset.name.rsplit(':', 1)[-1]}",
            progress,
        )
        if is_main():
            _join_map_chunks(path, num_chunks, dim)

    return open_or_build(path, "map cache", build, MapStore)


def _with_boxes(maps: ImageMaps) -> tuple[ImageMaps, np.ndarray]:
    return maps, maps.boxes


def _pack_maps(payloads: list[ImageMaps | None], dim: int) -> dict[str, np.ndarray]:
    """The arrays of a chunk of boundary maps: per item its ``ImageMaps``, or None for an unreadable image."""
    maps, shapes, factors, levels, level_counts = [], [], [], [], []
    for m in payloads:
        level_counts.append(0 if m is None else len(m.maps))
        if m is not None:
            maps += [x.reshape(-1, x.shape[-1]) for x in m.maps]
            shapes += [x.shape[:2] for x in m.maps]
            factors.append(m.factors)
            levels.append(m.level)
    return {
        "maps": np.concatenate(maps) if maps else np.zeros((0, dim), np.float16),
        "level_shape": np.array(shapes, np.int64).reshape(-1, 2),
        "level_factor": np.concatenate(factors) if factors else np.zeros((0, 2)),
        "level_counts": np.array(level_counts, np.int64),
        "patch_level": np.concatenate(levels) if levels else np.zeros(0, np.int64),
    }


def _join_map_chunks(path: Path, num_chunks: int, dim: int) -> None:
    parts = chunk_arrays(
        path, num_chunks, (*INDEX_ARRAYS, "level_shape", "level_factor", "level_counts", "patch_level")
    )

    def cat(name: str) -> np.ndarray:
        return np.concatenate(parts[name])

    shapes = cat("level_shape").reshape(-1, 2)
    cells = np.concatenate([[0], np.cumsum(shapes.prod(1))]).astype(np.int64)
    files = write_rows(
        path, {"maps": (np.dtype(np.float16), dim)}, int(cells[-1]), chunk_rows(path, num_chunks, ("maps",))
    )
    finish_join(
        path,
        parts,
        "map cache",
        files,
        patch_level=cat("patch_level"),
        level_offsets=np.concatenate([[0], np.cumsum(cat("level_counts"))]).astype(np.int64),
        level_shape=shapes,
        level_factor=cat("level_factor").reshape(-1, 2),
        cell_offsets=cells,
    )


class MapsAndHead(nn.Module):
    """The unlocked stages and the head as one module (``train.unlock``), so that DDP averages both's gradients."""

    def __init__(self, stages: UnlockedStages, head: nn.Module):
        super().__init__()
        self.stages, self.head = stages, head

    def forward(self, items: list[ImageMaps]) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch features of ``items`` and their logits."""
        x = self.stages(items)
        return x, self.head(x)
