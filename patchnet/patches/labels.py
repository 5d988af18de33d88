"""Patch labels from bounding boxes: the paper's overlap rules, the background, the patches left out, and the counts
of a labelled split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import patch_grid

IGNORE = -1  # label of patches left out of training
MULTI = -2  # multi-label mode: a patch that matches objects of several classes (targets kept aside)
POSITIVE_PATCH_FRACTION = 0.2  # rule (i):  |P ∩ B| >= 0.2 |P|
POSITIVE_BOX_FRACTION = 0.6  # rule (ii): |P ∩ B| >= 0.6 |B|


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
