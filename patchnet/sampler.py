"""The paper's multi-scale square patch grid, the plan of how an image's patches are computed, and patch labels
from bounding boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .recipe import PAPER_SCALES, PatchConfig

IGNORE = -1  # label of patches left out of training
MULTI = -2  # multi-label mode: a patch that matches objects of several classes (targets kept aside)
DEFAULT_STEP = 1 / 3  # about 500 patches on a 500x375 image; 1/2 gives about 275
POSITIVE_PATCH_FRACTION = 0.2  # rule (i):  |P ∩ B| >= 0.2 |P|
POSITIVE_BOX_FRACTION = 0.6  # rule (ii): |P ∩ B| >= 0.6 |B|


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


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def intersection_area(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) areas of pairwise intersections."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def label_patches(
    patches: np.ndarray,
    boxes: np.ndarray,
    box_classes: np.ndarray,
    box_difficult: np.ndarray,
    num_classes: int,
    image_labels: np.ndarray | None = None,
    multilabel: bool = False,
):
    """Training label of each patch: a class index, ``num_classes`` (background) or ``IGNORE``.

    P is positive for object B when |P∩B| >= 0.2|P| and |P∩B| >= 0.6|B| hold for B and for no
    other object. Patches matching two or more objects, or only a difficult one, are ignored.
    If ``image_labels`` (1/-1/0 per class) says a class is present but no box of it exists,
    the image's background patches may show it and are ignored too.

    With ``multilabel``, a patch matching non-difficult objects of one class only is that class,
    and one matching objects of several classes is ``MULTI``; the result is then ``(labels,
    targets)`` with ``targets`` the (P, C) bool matrix of matched classes.
    """
    labels = np.full(len(patches), num_classes, np.int64)
    box_classes = np.asarray(box_classes, np.int64)
    targets = np.zeros((len(patches), num_classes), bool)
    if len(boxes):
        inter = intersection_area(patches, boxes)
        eps = 1e-9  # float rounding must not flip a patch that meets a rule exactly
        match = (inter >= POSITIVE_PATCH_FRACTION * box_area(patches)[:, None] * (1 - eps)) & (
            inter >= POSITIVE_BOX_FRACTION * box_area(boxes)[None, :] * (1 - eps)
        )
        count = match.sum(axis=1)
        first = match.argmax(axis=1)
        single = count == 1
        labels[single] = box_classes[first[single]]
        labels[single & np.asarray(box_difficult, bool)[first]] = IGNORE
        labels[count >= 2] = IGNORE
        if multilabel:
            difficult = np.asarray(box_difficult, bool)
            for c in np.unique(box_classes):
                targets[:, c] = match[:, box_classes == c].any(1)
            several = (count >= 2) & ~(match & difficult[None, :]).any(1)
            n_cls = targets.sum(1)
            labels[several & (n_cls == 1)] = targets[several & (n_cls == 1)].argmax(1)
            labels[several & (n_cls >= 2)] = MULTI
    if image_labels is not None:
        boxed = np.zeros(num_classes, bool)
        boxed[box_classes] = True
        if np.any((np.asarray(image_labels) >= 0) & ~boxed):
            labels[labels == num_classes] = IGNORE
    return (labels, targets) if multilabel else labels


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts per label value: classes 0..C-1, background at C, IGNORE at C+1."""
    shifted = np.where(labels == IGNORE, num_classes + 1, labels)
    return np.bincount(shifted, minlength=num_classes + 2)


@dataclass
class SplitStatistics:
    """Counts of a split after labelling: images, objects and patches per label."""

    classes: list[str]
    images: int
    objects: np.ndarray  # (C,) non-difficult objects per class
    difficult: np.ndarray  # (C,) difficult objects per class
    patches: np.ndarray  # (C + 2,) patches per label: classes, background, ignored
    patches_per_image: np.ndarray  # (images,)
    unboxed_images: int  # images whose lists name a class that has no box

    def format(self) -> str:
        c = len(self.classes)
        width = max(len(n) for n in [*self.classes, "background"])
        ppi = self.patches_per_image
        lines = [
            f"{self.images} images, {int(ppi.sum())} patches "
            f"({ppi.mean():.0f} per image, min {ppi.min()}, max {ppi.max()})",
            f"{self.unboxed_images} images name a class with no box of it: their background patches are ignored",
            f"{'label':<{width}}  {'objects':>8}  {'difficult':>9}  {'patches':>9}",
        ]
        for i, name in enumerate(self.classes):
            lines.append(f"{name:<{width}}  {self.objects[i]:>8}  {self.difficult[i]:>9}  {self.patches[i]:>9}")
        lines.append(
            f"{'positive':<{width}}  {self.objects.sum():>8}  {self.difficult.sum():>9}  {self.patches[:c].sum():>9}"
        )
        lines.append(f"{'background':<{width}}  {'':>8}  {'':>9}  {self.patches[c]:>9}")
        lines.append(f"{'ignored':<{width}}  {'':>8}  {'':>9}  {self.patches[c + 1]:>9}")
        return "\n".join(lines)


def split_statistics(dataset, patches_cfg) -> SplitStatistics:
    """Label every patch of every image of a dataset and count the outcome."""
    c = len(dataset.classes)
    objects, difficult = np.zeros(c, np.int64), np.zeros(c, np.int64)
    totals, per_image, unboxed = np.zeros(c + 2, np.int64), [], 0
    for r in dataset.records:
        np.add.at(objects, r.box_classes[~r.box_difficult], 1)
        np.add.at(difficult, r.box_classes[r.box_difficult], 1)
        grid = patch_grid(r.width, r.height, patches_cfg.scales, patches_cfg.step)
        labels = label_patches(grid, r.boxes, r.box_classes, r.box_difficult, c, image_labels=r.labels)
        totals += label_counts(labels, c)
        per_image.append(len(grid))
        boxed = np.zeros(c, bool)
        boxed[r.box_classes] = True
        unboxed += bool(np.any((r.labels >= 0) & ~boxed))
    return SplitStatistics(
        list(dataset.classes), len(dataset), objects, difficult, totals, np.array(per_image), unboxed
    )
