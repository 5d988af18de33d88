"""Score maps: where in an image each class was found, as per-pixel means (or maxima) of the values of the patches
covering each pixel, for heatmaps, the pointing game and boxes (``localize``). The prior they take is the resolved
``infer.map_prior`` (``scoring.InferOptions``)."""

from __future__ import annotations

import numpy as np

from ..head.layers import AdaptationHead
from ..head.pooling import map_values
from .metrics import PointingResult, point_hits, union_fraction


def score_map(
    boxes: np.ndarray, values: np.ndarray, width: int, height: int, reduce: str = "mean", prior: float = 0.0
) -> np.ndarray:
    """(H, W) map: at each pixel, the mean (or max) of ``values`` over the patches that cover it.

    A pixel is covered by a patch when its centre lies inside; uncovered pixels are 0. ``prior``
    adds that many pseudo-patches holding the image's mean value to every pixel's mean: near the
    borders few patches overlap and one high patch would otherwise dominate the mean.
    """
    boxes = np.asarray(boxes, np.float64)
    values = np.asarray(values, np.float64)
    x1 = np.clip(np.ceil(boxes[:, 0] - 0.5), 0, width).astype(int)
    y1 = np.clip(np.ceil(boxes[:, 1] - 0.5), 0, height).astype(int)
    x2 = np.clip(np.ceil(boxes[:, 2] - 0.5), 0, width).astype(int)
    y2 = np.clip(np.ceil(boxes[:, 3] - 0.5), 0, height).astype(int)
    if reduce == "max":
        out = np.zeros((height, width))
        for i in np.argsort(values, kind="stable"):  # higher values paint last
            out[y1[i] : y2[i], x1[i] : x2[i]] = values[i]
        return out.astype(np.float32)
    if reduce != "mean":
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    # 2-D difference arrays: +v at the top-left corner, -v past the right and bottom edges
    diff = np.zeros((2, height + 1, width + 1))
    for layer, v in ((0, values), (1, np.ones_like(values))):
        np.add.at(diff[layer], (y1, x1), v)
        np.add.at(diff[layer], (y1, x2), -v)
        np.add.at(diff[layer], (y2, x1), -v)
        np.add.at(diff[layer], (y2, x2), v)
    sums = diff.cumsum(1).cumsum(2)[:, :height, :width]
    mean = values.mean() if len(values) else 0.0
    return np.where(sums[1] > 0.5, (sums[0] + prior * mean) / np.maximum(sums[1] + prior, 1e-12), 0.0).astype(
        np.float32
    )


def pointing_game(
    head: AdaptationHead, store, dataset, items: np.ndarray, pool: str, prior: float = 0.0, tolerance: float = 15.0
) -> PointingResult:
    """The pointing game (Zhang et al. 2016) on the mean score maps of store items."""
    hits, centre, hard = [], [], []
    for i in items:
        rec = dataset.records[store.record[i]]
        present = [
            c
            for c in range(len(dataset.classes))
            if rec.labels[c] == 1 and np.any((rec.box_classes == c) & ~rec.box_difficult)
        ]
        if not present:
            continue
        s = store.item_slice(i)
        values = map_values(head.logits(store.rows[s]), pool).numpy()
        for c in present:
            m = score_map(store.patch_boxes[s], values[:, c], rec.width, rec.height, prior=prior)
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            boxes = rec.boxes[(rec.box_classes == c) & ~rec.box_difficult]
            hits.append(point_hits(x + 0.5, y + 0.5, boxes, tolerance))
            centre.append(point_hits(rec.width / 2, rec.height / 2, boxes, tolerance))
            others = np.any(np.delete(rec.labels, c) == 1)
            hard.append(bool(others and union_fraction(boxes, rec.width, rec.height) < 0.25))
    return PointingResult(np.array(hits, bool), np.array(centre, bool), np.array(hard, bool))
