"""The paper's multi-scale square patch grid and the plan of how an image's patches are computed (which levels of
the trunk's maps, which patches cropped); their labels are ``patchnet.patches.labels``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..recipe import PAPER_SCALES, PatchConfig

DEFAULT_STEP = 1 / 3  # about 500 patches on a 500x375 image; 1/2 gives about 275


@dataclass
class ScaleGrid:
    """The patches of one scale: all share the side ``side``."""

    scale: float
    side: float
    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2


def _axis_positions(length: float, side: float, stride: float) -> np.ndarray:
    if length - side <= 1e-6:
        return np.zeros(1)
    # A relative tolerance keeps a step written as 0.3333 from adding a snapped near-duplicate of the
    # last patch; the last gap may then exceed the stride slightly, but never half the side.
    gaps = max(1, math.ceil((length - side) / stride * (1 - 1e-3)))
    if (length - side) - (gaps - 1) * stride > 0.5 * side + 1e-9:
        gaps += 1
    n = gaps + 1
    pos = np.arange(n, dtype=np.float64) * stride
    pos[-1] = length - side  # snap the last patch to the border
    return pos


def grid_by_scale(width: int, height: int, scales=PAPER_SCALES, step: float = DEFAULT_STEP) -> list[ScaleGrid]:
    """Square patches of side ``min(w, h) / scale`` on a regular grid of stride ``step * side`` per scale."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < step <= 0.5:
        raise ValueError(f"step must lie in (0, 0.5] so that neighbours overlap by at least 50%, got {step}")
    grids = []
    for scale in scales:
        if scale < 1:
            raise ValueError(f"scales must be >= 1 (a patch cannot exceed the short side), got {scale}")
        side = min(width, height) / scale
        xs = _axis_positions(width, side, step * side)
        ys = _axis_positions(height, side, step * side)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        boxes = np.stack([xx.ravel(), yy.ravel(), xx.ravel() + side, yy.ravel() + side], axis=1)
        grids.append(ScaleGrid(float(scale), side, boxes.astype(np.float32)))
    return grids


def patch_grid(width: int, height: int, scales=PAPER_SCALES, step: float = DEFAULT_STEP) -> np.ndarray:
    """All patches of all scales, (N, 4) float32 ``x1, y1, x2, y2`` in pixels, scale by scale."""
    return np.concatenate([g.boxes for g in grid_by_scale(width, height, scales, step)])


@dataclass
class Level:
    """One trunk pass of shared mode: the image rescaled by ``factor``, and the scales pooled from it."""

    factor: float
    grids: list[int]  # indices into the plan's grids


@dataclass
class PatchPlan:
    """Every patch of one image and how its feature is computed, made once per image (``patch_plan``).

    ``grids`` hold the patches scale by scale (their concatenation, ``boxes``, is the order of the
    features); the grids in ``cropped`` run through the trunk one patch at a time (exact mode, and
    shared mode's ``patches.exact_up_to``); shared mode pools the others from the trunk passes of
    ``levels``. Whole mode: one grid of two "patches", the image and its mirror.
    """

    width: int
    height: int
    mode: str
    grids: list[ScaleGrid]
    cropped: list[int] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 every patch, in the order of the features."""
        return np.concatenate([g.boxes for g in self.grids])

    def level_of_patch(self) -> np.ndarray:
        """(N,) the level each patch is pooled from (shared mode)."""
        starts = np.cumsum([0] + [len(g.boxes) for g in self.grids])
        out = np.zeros(starts[-1], np.int64)
        for lv, level in enumerate(self.levels):
            for i in level.grids:
                out[starts[i] : starts[i + 1]] = lv
        return out


def patch_plan(width: int, height: int, cfg: PatchConfig, input_size: int) -> PatchPlan:
    """The plan of ``patches.mode`` for a width x height image and a trunk of ``input_size`` pixels.

    Shared mode pools each scale from the pyramid level nearest in log-scale (``patches.levels``; by
    default one level per scale); a level rescales the image so that its short side is
    ``input_size * level``, the long side capped at ``patches.max_side``.
    """
    if cfg.mode == "whole":  # the image and its mirror image, each as one "patch"
        whole = np.array([[0, 0, width, height]] * 2, np.float32)
        return PatchPlan(width, height, "whole", [ScaleGrid(1.0, float(min(width, height)), whole)])
    grids = grid_by_scale(width, height, cfg.scales, cfg.step)
    if cfg.mode == "exact":
        return PatchPlan(width, height, "exact", grids, cropped=list(range(len(grids))))
    cropped = [i for i, g in enumerate(grids) if g.scale <= cfg.exact_up_to]
    chosen = cfg.levels or [g.scale for g in grids]
    assign: dict[float, list[int]] = {}
    for i, g in enumerate(grids):
        if i not in cropped:
            assign.setdefault(min(chosen, key=lambda v: abs(math.log(v / g.scale))), []).append(i)
    levels = []
    for lv, members in sorted(assign.items()):
        factor = input_size * lv / min(width, height)
        levels.append(Level(factor * min(1.0, cfg.max_side / (max(width, height) * factor)), members))
    return PatchPlan(width, height, "shared", grids, cropped, levels)
