"""Pascal VOC classification AP: the VOC2007 11-point AP and the VOC2010+ envelope AP."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("patchnet")


def precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest score first.

    Labels are 1 (positive), -1 (negative) or 0 (difficult: left out). Tied scores form one
    threshold, so the result does not depend on the order of tied images.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError(f"labels must be 1, -1 or 0; got values {sorted(set(labels.tolist()) - {-1, 0, 1})}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    keep = labels != 0
    scores, positive = scores[keep], labels[keep] == 1
    npos = int(positive.sum())
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    tp = np.cumsum(positive)
    fp = np.cumsum(~positive)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    recall = tp / max(npos, 1)
    precision = tp / np.maximum(tp + fp, 1)
    return precision, recall


def voc_ap(scores: np.ndarray, labels: np.ndarray, use_07_metric: bool = True) -> float:
    """VOC average precision of one class; NaN (undefined) when it has no positive image.

    ``use_07_metric=True``: the VOC2007 11-point interpolated AP, the mean over recall levels
    t = 0, 0.1, ..., 1 of the best precision at recall >= t. ``False``: the VOC2010+ AP, the area
    under the monotone envelope of the precision/recall curve.
    """
    precision, recall = precision_recall(scores, labels)
    if not (np.asarray(labels) == 1).any():
        return float("nan")
    if use_07_metric:
        ap = 0.0
        for t in np.arange(11) / 10:  # i/10, so that a recall of exactly 0.3 reaches t=0.3
            above = recall >= t
            ap += precision[above].max() if above.any() else 0.0
        return float(ap / 11)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at any higher recall
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


@dataclass
class APTable:
    """Per-class APs (NaN where undefined) and their means over the defined classes.

    For single-label data it also holds top-1 accuracy and mean per-class accuracy (MIT-67's measure).
    """

    classes: list[str]
    ap07: np.ndarray
    ap: np.ndarray
    top1: float | None = None
    mean_class_accuracy: float | None = None

    def __post_init__(self) -> None:
        mean_ap(self.ap, self.classes, warn=True)  # warn once about undefined classes

    @property
    def map07(self) -> float:
        return mean_ap(self.ap07, warn=False)

    @property
    def map(self) -> float:
        return mean_ap(self.ap, warn=False)

    def to_dict(self) -> dict:
        def clean(x: float):
            return None if np.isnan(x) else round(float(x), 6)

        out = {
            "classes": {c: {"ap07": clean(a), "ap": clean(b)} for c, a, b in zip(self.classes, self.ap07, self.ap)},
            "map07": clean(self.map07),
            "map": clean(self.map),
        }
        if self.top1 is not None:
            out.update(top1=clean(self.top1), mean_class_accuracy=clean(self.mean_class_accuracy))
        return out

    def format(self) -> str:
        """A plain-text table in percent."""
        width = max(len(c) for c in [*self.classes, "class"])
        lines = [f"{'class':<{width}}  {'AP07':>6}  {'AP':>6}"]
        for c, a, b in zip(self.classes, self.ap07, self.ap):
            lines.append(f"{c:<{width}}  {_pct(a):>6}  {_pct(b):>6}")
        lines.append(f"{'mAP':<{width}}  {_pct(self.map07):>6}  {_pct(self.map):>6}")
        if self.top1 is not None:
            lines.append(f"top-1 accuracy {_pct(self.top1)}, mean per-class accuracy {_pct(self.mean_class_accuracy)}")
        return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:.1f}"


def mean_ap(aps: np.ndarray, classes: list[str] | None = None, warn: bool = True) -> float:
    """Mean over classes with a defined AP; undefined classes are left out with a warning."""
    aps = np.asarray(aps, np.float64)
    undefined = np.isnan(aps)
    if undefined.any() and warn:
        names = [classes[i] if classes else str(i) for i in np.flatnonzero(undefined)]
        log.warning("AP undefined (no positive image) for %s; left out of the mean", ", ".join(names))
    return float(aps[~undefined].mean()) if (~undefined).any() else float("nan")


def accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 accuracy and mean per-class accuracy of single-label data: the arg-max class against the one label 1."""
    truth, guess = np.asarray(labels).argmax(1), np.asarray(scores).argmax(1)
    per_class = [np.mean(guess[truth == c] == c) for c in np.unique(truth)]
    return float(np.mean(guess == truth)), float(np.mean(per_class))


def ap_table(scores: np.ndarray, labels: np.ndarray, classes: list[str], single_label: bool = False) -> APTable:
    """Both APs for every class of (N, C) image scores and (N, C) 1/-1/0 labels (and accuracy if single-label)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.shape[1] != len(classes):
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (images, {len(classes)})")
    ap07 = np.array([voc_ap(scores[:, c], labels[:, c], True) for c in range(len(classes))])
    ap = np.array([voc_ap(scores[:, c], labels[:, c], False) for c in range(len(classes))])
    return APTable(list(classes), ap07, ap, *(accuracy(scores, labels) if single_label else (None, None)))


# --------------------------------------------------------------------------- the pointing game


def point_hits(x: float, y: float, boxes: np.ndarray, tolerance: float = 15.0) -> bool:
    """Whether the point lies within ``tolerance`` pixels of one of the boxes (inside counts as distance 0)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    dx = np.maximum(np.maximum(boxes[:, 0] - x, x - boxes[:, 2]), 0)
    dy = np.maximum(np.maximum(boxes[:, 1] - y, y - boxes[:, 3]), 0)
    return bool(np.any(np.hypot(dx, dy) <= tolerance))


def union_fraction(boxes: np.ndarray, width: int, height: int) -> float:
    """The fraction of the image covered by the union of the boxes."""
    mask = np.zeros((height, width), bool)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        mask[int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))] = True
    return float(mask.mean())


@dataclass
class PointingResult:
    """Pointing-game outcomes per (image, present class) pair: the map's maximum, the image centre, and
    which pairs form the harder subset (the class covers under a quarter of the image, another class is present)."""

    hits: np.ndarray
    centre: np.ndarray
    hard: np.ndarray

    def rates(self) -> dict:
        def rate(x):
            return float(x.mean()) if len(x) else float("nan")

        return {
            "all": rate(self.hits),
            "all_centre": rate(self.centre),
            "hard": rate(self.hits[self.hard]),
            "hard_centre": rate(self.centre[self.hard]),
            "pairs": len(self.hits),
            "hard_pairs": int(self.hard.sum()),
        }

    def format(self) -> str:
        r = self.rates()
        return (
            f"pointing game: all {r['pairs']} pairs {_pct(r['all'])}% (centre point {_pct(r['all_centre'])}%); "
            f"harder subset, {r['hard_pairs']} pairs: {_pct(r['hard'])}% (centre point {_pct(r['hard_centre'])}%)"
        )
