"""Boxes from image labels: where each class is, from the scores of an image's patches.

Every scored patch is already a square box with a score. ``method``:

- ``map`` (the default): the class's score map (each pixel the mean value of the patches covering it,
  ``patchnet.evaluation.maps.score_map``), min-max normalised and thresholded at ``threshold``; each connected
  region above it is one box, the region holding the peak first (CAM's recipe, on patch scores). The
  normalisation matters: large patches that hold the object lift the whole map, and a cut at a
  fraction of the peak alone then merges regions (CorLoc 39.6 against 40.5 on held-out devtrain).
- ``patch``: the single highest-scoring patch (a baseline).
- ``whole``: the whole image (a baseline).

A box's score lies in [0, 1]: the image's confidence in the class (its calibrated probability where the
checkpoint carries a calibration, else its pooled score squashed into [0, 1], ``confidence``) times its
region's peak over the map's peak (both above the map's minimum), so that the first box of an image keeps
the image's confidence and ranks images as classification does, and the others rank below it.
``localize`` takes that confidence as its log (what ``Model.localize`` passes: the log of the probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..errors import PatchnetError
from ..head.pooling import map_values
from ..recipe import InferConfig
from .maps import score_map
from .metrics import LocalizationResult, corloc_hits, detection_ap

METHODS = ("map", "patch", "whole")  # from the patches' scores
BOX_METHODS = ("auto", "mil", *METHODS)  # what a user may ask for: auto and mil resolve through the checkpoint


class BoxOptionError(PatchnetError, ValueError):
    """A box method or threshold outside what ``localize`` accepts."""


def check_box_options(method: str, threshold: float, accepted: tuple[str, ...] = METHODS) -> None:
    """Raise a one-line error for a method outside ``accepted`` or a ``map`` cut outside [0, 1]."""
    if method not in accepted:
        raise BoxOptionError(f"the box method must be one of {', '.join(accepted)}, got {method!r}")
    if method == "map" and not 0.0 <= threshold <= 1.0:
        raise BoxOptionError(
            f"the map's cut must lie in [0, 1] (0 the map's floor, 1 its peak; default "
            f"{InferConfig.box_threshold:g}), got {threshold:g}"
        )


def box_options(
    infer: InferConfig, method: str | None = None, threshold: float | None = None, detector: bool = False
) -> tuple[str, float]:
    """The box method and map cut a caller asked for, else the recipe's ``infer`` ones; checked. ``auto`` is
    ``mil`` where the checkpoint has a detection head (``detector``), else ``map``; ``mil`` needs one."""
    method = method or infer.box_method
    threshold = infer.box_threshold if threshold is None else threshold
    check_box_options(method, threshold, BOX_METHODS)
    if method == "auto":
        method = "mil" if detector else "map"
    if method == "mil" and not detector:
        raise BoxOptionError(
            "the box method mil needs a checkpoint with a detection head (trained with train.detector: mil); "
            f"this one has none: use one of {', '.join(METHODS)}"
        )
    return method, threshold


@dataclass(frozen=True)
class Detection:
    """One box of a class in an image: ``box`` is ``x1, y1, x2, y2`` in pixels (COCO's ``x, y, w, h`` is
    ``x1, y1, x2 - x1, y2 - y1``), ``score`` in [0, 1] (the module docstring)."""

    class_index: int
    box: tuple[float, float, float, float]
    score: float

    def to_dict(self, classes: list[str] | None = None) -> dict:
        x1, y1, x2, y2 = self.box
        out = {"class": classes[self.class_index] if classes else self.class_index, "score": round(self.score, 6)}
        return {**out, "box": [round(v, 2) for v in (x1, y1, x2, y2)]}


def confidence(scores: np.ndarray, pool: str, k: float = 5.0, calibration=None, fused: bool = False) -> np.ndarray:
    """Pooled image scores as a confidence in [0, 1] per class: the calibrated probability where ``calibration``
    (``patchnet.head.calibration.Calibration``, fitted for this pooling) is given, else the score squashed: the
    power-k mean's k-th root (the generalised mean of the patches' probabilities, in [0, 1]), or the logistic
    of an evidence pooling's score (a logit) or of a fused score."""
    scores = np.asarray(scores, np.float64)
    if calibration is not None:
        return calibration.probabilities(scores)
    if pool == "power" and not fused:
        return np.clip(scores, 0.0, 1.0) ** (1.0 / k)
    return 1 / (1 + np.exp(-np.clip(scores, -60, 60)))


def map_regions(values: np.ndarray, threshold: float) -> list[tuple[tuple[float, float, float, float], float]]:
    """The bounding boxes of the connected regions of an (H, W) map at or above ``threshold`` of the way from its
    minimum to its peak, each with its peak above the minimum, the region holding the map's peak first."""
    if not values.size:
        return []
    low, peak = float(values.min()), float(values.max())
    if peak <= low:  # a flat map: no region stands out
        return []
    labels, _ = ndimage.label(values >= low + threshold * (peak - low), structure=np.ones((3, 3), bool))
    regions = []
    for index, found in enumerate(ndimage.find_objects(labels), 1):
        if found is None:
            continue
        ys, xs = found
        regions.append(
            (
                (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)),
                float(values[found][labels[found] == index].max()) - low,
            )
        )
    return sorted(regions, key=lambda r: -r[1])


def localize(
    boxes: np.ndarray,
    values: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    classes: list[int],
    method: str = "map",
    threshold: float = 0.5,
    prior: float = 0.0,
    max_boxes: int = 5,
) -> list[Detection]:
    """Boxes of ``classes`` in one image from its (N, 4) patch ``boxes``, their (N, C) map ``values`` and the
    image's (C,) ``scores``: the log of its confidence in each class (``np.log(confidence(...))``; a value
    above 0 counts as 0). Each box's score, in [0, 1], is that confidence times its region's share of the
    map's peak (see the module docstring for ``method``)."""
    check_box_options(method, threshold)
    return [
        Detection(c, box, float(np.exp(min(float(scores[c]) + share, 0.0))))
        for c in classes
        for box, share in _class_boxes(boxes, values[:, c], width, height, method, threshold, prior, max_boxes)
    ]


def _class_boxes(
    boxes: np.ndarray,
    values: np.ndarray,
    width: int,
    height: int,
    method: str,
    threshold: float,
    prior: float,
    max_boxes: int = 5,
) -> list[tuple[tuple[float, float, float, float], float]]:
    """The boxes of one class from its (N,) patch ``values``, each with the log of its region's peak over the
    map's peak (0 for the first box, and for ``patch`` and ``whole``)."""
    if method == "whole":
        return [((0.0, 0.0, float(width), float(height)), 0.0)]
    if method == "patch":
        x1, y1, x2, y2 = (float(v) for v in boxes[int(np.argmax(values))])
        return [((max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)), 0.0)]
    regions = map_regions(score_map(boxes, values, width, height, prior=prior), threshold)
    top = regions[0][1] if regions else 1.0
    return [(box, float(np.log(max(peak / top, 1e-12)))) for box, peak in regions[:max_boxes]]


def map_boxes(head, store, item: int, width: int, height: int, classes, pool: str, infer: InferConfig) -> dict:
    """class -> the first box of the score-map method (``infer.box_threshold``, ``infer.map_prior``) of feature
    store ``item``, for ``classes`` (where the map has a region)."""
    s = store.item_slice(item)
    values = map_values(head.logits(store.rows[s]), pool).numpy()
    out = {}
    for c in classes:
        found = _class_boxes(
            store.patch_boxes[s], values[:, c], width, height, "map", infer.box_threshold, infer.map_prior, 1
        )
        if found:
            out[c] = found[0][0]
    return out


def evaluate_localization(
    head,
    store,
    dataset,
    items: np.ndarray,
    scores: np.ndarray,
    pool: str,
    method: str = "map",
    threshold: float = 0.5,
    prior: float = 0.0,
    progress: bool = True,
) -> LocalizationResult:
    """CorLoc and VOC detection AP of every class on store ``items`` of a split with boxes, from their
    (I, C) image ``scores`` (the first box of a class is the one CorLoc judges). Detections rank by the image's
    score plus the log of their region's share of the map's peak (the ranking is all detection AP sees)."""
    check_box_options(method, threshold)
    tally = _BoxTally(len(dataset.classes))
    for row, i in enumerate(tqdm(items, desc="localize", unit="img", disable=not progress)):
        rec = dataset.records[store.record[i]]
        s = store.item_slice(i)
        values = map_values(head.logits(store.rows[s]), pool).numpy()
        found = []
        for c in range(len(dataset.classes)):
            boxes = _class_boxes(store.patch_boxes[s], values[:, c], rec.width, rec.height, method, threshold, prior)
            found += [(c, float(scores[row, c]) + share, box) for box, share in boxes]
        tally.add(row, rec, found)
    return tally.result(list(dataset.classes))


class _BoxTally:
    """Each image's boxes against its ground truth: what detection AP reads, and CorLoc's hits and pairs."""

    def __init__(self, num: int):
        self.detections: list[list] = [[] for _ in range(num)]
        self.truth: list[dict] = [{} for _ in range(num)]
        self.hits, self.pairs = np.zeros(num), np.zeros(num)

    def add(self, row: int, rec, found) -> None:
        """One image's (class, ranking score, box) boxes; the first of each class is the one CorLoc judges."""
        first: dict[int, np.ndarray] = {}
        for c, score, box in found:
            self.detections[c].append((row, score, np.asarray(box, np.float64)))
            first.setdefault(c, np.asarray(box, np.float64))
        for c in np.unique(rec.box_classes):
            mine = rec.box_classes == c
            self.truth[c][row] = (rec.boxes[mine], rec.box_difficult[mine])
            if (~rec.box_difficult[mine]).any():  # a positive pair: the class has a box that is not difficult
                self.pairs[c] += 1
                self.hits[c] += c in first and corloc_hits(first[c], rec.boxes[mine])

    def result(self, classes: list[str]) -> LocalizationResult:
        num = len(classes)
        aps = np.array([detection_ap(self.detections[c], self.truth[c]) for c in range(num)]).reshape(num, 2)
        with np.errstate(invalid="ignore"):
            corloc = np.where(self.pairs > 0, self.hits / np.maximum(self.pairs, 1), np.nan)
        return LocalizationResult(classes, corloc, self.pairs, aps[:, 0], aps[:, 1])


def evaluate_detector(
    mil, store, dataset, items: np.ndarray, cfg, geometry: dict, dtype=None, progress: bool = True
) -> tuple[LocalizationResult, np.ndarray]:
    """CorLoc and VOC detection AP of every class from the detection head (``train.detector: mil``) on map store
    ``items`` of a split with boxes, and the (I, C) image scores of its WSDDN stream (a classifier too).

    Every class of every image gets its boxes after class-wise NMS (``cfg.nms``, ``cfg.max_boxes``); CorLoc
    judges the top one of each class present."""
    from ..head.mil import detect, store_regions

    num = len(dataset.classes)
    tally = _BoxTally(num)
    image_scores = np.zeros((len(items), num))
    device = mil.cls.weight.device
    for row, i in enumerate(tqdm(items, desc="detect", unit="img", disable=not progress)):
        regions = store_regions(store, dataset, int(i), cfg, geometry, device)
        found, image_scores[row] = detect(mil, regions, cfg, range(num), dtype)
        tally.add(row, dataset.records[store.record[i]], [(c, score, box) for c, box, score in found])
    return tally.result(list(dataset.classes)), image_scores
