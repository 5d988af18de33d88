"""Pascal VOC classification AP (the VOC2007 11-point AP and the VOC2010+ envelope AP), accuracy, the pointing
game, and localisation: CorLoc and VOC detection AP."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("patchnet")


def precision_recall(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest score first.

    Labels are 1 (positive), -1 (negative) or 0 (difficult: left out). Tied scores form one
    threshold, so the result does not depend on the order of tied images. ``weights`` counts every
    image that many times (a bootstrap resample); (R, n) weights give (R, thresholds) curves, one per row.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError(f"labels must be 1, -1 or 0; got values {sorted(set(labels.tolist()) - {-1, 0, 1})}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
    if w.shape[-1] != len(scores) or w.ndim > 2:
        raise ValueError(f"weights must be (n,) or (R, n) for n = {len(scores)} images, got {w.shape}")
    keep = labels != 0
    scores, positive, w = scores[keep], labels[keep] == 1, w[..., keep]
    order = np.argsort(-scores, kind="mergesort")
    scores, positive, w = scores[order], positive[order], w[..., order]
    tp = np.cumsum(w * positive, -1)
    fp = np.cumsum(w * ~positive, -1)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp, fp = tp[..., last_of_tie], fp[..., last_of_tie]
    npos = (w * positive).sum(-1, keepdims=True)
    recall = np.divide(tp, npos, out=np.zeros_like(tp), where=npos > 0)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    return precision, recall


def voc_ap(scores: np.ndarray, labels: np.ndarray, use_07_metric: bool = True, weights: np.ndarray | None = None):
    """VOC average precision of one class; NaN (undefined) when it has no positive image.

    ``use_07_metric=True``: the VOC2007 11-point interpolated AP, the mean over recall levels
    t = 0, 0.1, ..., 1 of the best precision at recall >= t. ``False``: the VOC2010+ AP, the area
    under the monotone envelope of the precision/recall curve. (R, n) ``weights`` (11-point only): the
    (R,) APs of R resamples of the images, each counting every image as often as its row says.
    """
    if weights is not None and np.ndim(weights) == 2:
        if not use_07_metric:
            raise ValueError("voc_ap: (R, n) weights give the 11-point AP only (use_07_metric=True)")
        precision, recall = precision_recall(scores, labels, weights)
        positives = (np.asarray(weights) * (np.asarray(labels).ravel() == 1)).sum(1)
        return np.where(positives > 0, _ap07(precision, recall), np.nan)
    precision, recall = precision_recall(scores, labels, weights)
    positive = np.asarray(labels).ravel() == 1
    if not (positive.any() if weights is None else (np.asarray(weights) * positive).sum() > 0):
        return float("nan")
    return _curve_ap(precision, recall, use_07_metric)


def _ap07(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """The 11-point AP of curves along the last axis: the mean over t = i/10 of the best precision at recall >= t
    (i/10, so that a recall of exactly 0.3 reaches t = 0.3)."""
    if precision.shape[-1] == 0:
        return np.zeros(precision.shape[:-1])
    return sum(np.where(recall >= t, precision, 0.0).max(-1) for t in np.arange(11) / 10) / 11


def _curve_ap(precision: np.ndarray, recall: np.ndarray, use_07_metric: bool) -> float:
    """AP of a precision/recall curve: the 11-point mean, or the area under the monotone envelope."""
    if use_07_metric:
        return float(_ap07(precision, recall))
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
            assert self.mean_class_accuracy is not None  # set with top1 (ap_table)
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
            assert self.mean_class_accuracy is not None  # set with top1 (ap_table)
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


def confusion_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, C) counts of single-label images: row = the true class (the one label 1), column = the arg-max class."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    c = scores.shape[1]
    truth, guess = labels.argmax(1), scores.argmax(1)
    return np.bincount(truth * c + guess, minlength=c * c).reshape(c, c)


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


# --------------------------------------------------------------------------- localisation


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(K,) intersection over union of one box with K boxes, ``x1, y1, x2, y2`` in continuous pixels."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-12)


def detection_ap(
    detections: list[tuple[int, float, np.ndarray]], truth: dict[int, tuple[np.ndarray, np.ndarray]], iou: float = 0.5
) -> tuple[float, float]:
    """VOC detection AP of one class, as the VOC devkit computes it: (11-point, envelope).

    ``detections``: (image, score, box) over all images; ``truth``: image -> (boxes (K, 4), difficult
    (K,)) of the class. Highest score first, a detection is a true positive when its best-overlapping
    box overlaps it by more than ``iou`` and was not matched before; one whose best box is difficult
    counts neither way; NaN when the class has no box that is not difficult.
    """
    npos = int(sum((~d).sum() for _, d in truth.values()))
    if npos == 0:
        return float("nan"), float("nan")
    used = {i: np.zeros(len(b), bool) for i, (b, _) in truth.items()}
    tp, fp = [], []
    for image, _, box in sorted(detections, key=lambda d: -d[1]):
        boxes, difficult = truth.get(image, (np.zeros((0, 4)), np.zeros(0, bool)))
        overlaps = box_iou(box, boxes) if len(boxes) else np.zeros(0)
        j = int(np.argmax(overlaps)) if len(overlaps) else -1
        if j >= 0 and overlaps[j] > iou:
            if difficult[j]:
                continue
            hit = not used[image][j]
            used[image][j] = True
        else:
            hit = False
        tp.append(hit)
        fp.append(not hit)
    tps, fps = np.cumsum(tp), np.cumsum(fp)
    recall, precision = tps / npos, tps / np.maximum(tps + fps, 1e-12)
    return _curve_ap(precision, recall, True), _curve_ap(precision, recall, False)


def corloc_hits(top: np.ndarray, boxes: np.ndarray, iou: float = 0.5) -> bool:
    """CorLoc's test of one (image, class) pair: its top box overlaps a box of the class by ``iou`` or more."""
    return bool(len(boxes) and box_iou(top, boxes).max() >= iou)


@dataclass
class LocalizationResult:
    """Per class: CorLoc (the share of positive image-class pairs whose top box overlaps a box of the class
    at IoU >= 0.5) and VOC detection AP at IoU 0.5 (11-point and envelope)."""

    classes: list[str]
    corloc: np.ndarray  # (C,) NaN where no image shows the class
    pairs: np.ndarray  # (C,) positive image-class pairs
    ap07: np.ndarray
    ap: np.ndarray

    def means(self) -> dict:
        """CorLoc as the mean over classes (as WSDDN and OICR report it) and over all pairs; detection mAP."""
        hits = np.nansum(self.corloc * self.pairs)
        return {
            "corloc": float(np.nanmean(self.corloc)),
            "corloc_pairs": float(hits / max(self.pairs.sum(), 1)),
            "det_map07": float(np.nanmean(self.ap07)),
            "det_map": float(np.nanmean(self.ap)),
            "pairs": int(self.pairs.sum()),
        }

    def to_dict(self) -> dict:
        per = {
            c: {"corloc": _num(a), "pairs": int(n), "ap07": _num(b), "ap": _num(d)}
            for c, a, n, b, d in zip(self.classes, self.corloc, self.pairs, self.ap07, self.ap)
        }
        return {"classes": per, **self.means()}

    def format(self) -> str:
        width = max(len(c) for c in [*self.classes, "mean"])
        lines = [f"{'class':<{width}}  {'CorLoc':>7}  {'pairs':>5}  {'detAP07':>7}  {'detAP':>6}"]
        for c, a, n, b, d in zip(self.classes, self.corloc, self.pairs, self.ap07, self.ap):
            lines.append(f"{c:<{width}}  {_pct(a):>7}  {int(n):>5}  {_pct(b):>7}  {_pct(d):>6}")
        m = self.means()
        lines.append(
            f"{'mean':<{width}}  {_pct(m['corloc']):>7}  {m['pairs']:>5}  {_pct(m['det_map07']):>7}  "
            f"{_pct(m['det_map']):>6}"
        )
        lines.append(f"CorLoc over all {m['pairs']} pairs: {_pct(m['corloc_pairs'])}")
        return "\n".join(lines)


def _num(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 6)
