"""The fused classifier: the head's pooled image score plus a max-pool linear classifier's decision.

A box-free view of the image (its strongest response to each feature over all patches, scored by a
linear SVM fitted on the training images) that the patch head misses; the weight between the two is
chosen on held-out training images (``infer.fuse``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluation.metrics import mean_ap, voc_ap
from .calibration import score_feature
from .pooling import l2_normalize

FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


@dataclass
class Fusion:
    """The head's pooled image score plus ``weight`` times a max-pool linear classifier's decision.

    Both are z-scored per class (a power-k mean on its logarithm) with statistics of held-out
    training images, on which ``weight`` is chosen too. The classifier is a box-free view of the
    image (its strongest response to each feature over all patches) that the head misses.
    """

    pool: str
    coef: np.ndarray  # (C, d) on L2-normalised max-pooled features
    intercept: np.ndarray  # (C,)
    head_mean: np.ndarray
    head_std: np.ndarray
    linear_mean: np.ndarray
    linear_std: np.ndarray
    weight: float | np.ndarray  # one for every class, or (C,)

    def decision(self, pooled: np.ndarray) -> np.ndarray:
        return l2_normalize(pooled) @ self.coef.T + self.intercept

    def combine(self, head_scores: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        h = (score_feature(head_scores, self.pool) - self.head_mean) / self.head_std
        return h + self.weight * (decisions - self.linear_mean) / self.linear_std

    def weight_text(self) -> str:
        """The weight as a person reads it: one number, or the range of the per-class weights."""
        w = np.asarray(self.weight)
        return f"{float(w):g}" if w.ndim == 0 else f"per class, {w.min():g} to {w.max():g}"

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {
            k: (np.asarray(v, np.float64) if isinstance(v, list) else v) for k, v in d.items() if k in names
        }
        return cls(**values)


def fit_fusion(
    pool: str,
    coef: np.ndarray,
    intercept: np.ndarray,
    head_scores: np.ndarray,
    pooled: np.ndarray,
    labels: np.ndarray,
    weights=FUSION_WEIGHTS,
    shrink: float | None = None,
    shared: bool = False,
) -> tuple[Fusion, dict]:
    """Choose the fusion weight by 11-point mAP on held-out (head scores, max-pooled features, labels).

    ``shared``: z-score both with one mean and deviation for every class instead of each class's own, so that
    fused scores of different classes stay comparable (single-label data, where an image's class is its
    arg-max: per-class statistics of a few held-out images reorder the classes).

    With ``shrink``, each class gets its own weight: its best by its held-out AP, averaged with the shared
    weight as if that were ``shrink`` more positives (``n_c w_c + shrink w) / (n_c + shrink)``).
    Returns the fusion and the held-out mAP of every shared weight tried.
    """
    decisions = l2_normalize(pooled) @ coef.T + intercept
    h = score_feature(head_scores, pool)
    axis, c = (None if shared else 0), h.shape[1]
    stats = {  # (C,) each, equal across classes where shared
        "head_mean": np.broadcast_to(h.mean(axis), c).copy(),
        "head_std": np.broadcast_to(h.std(axis), c) + 1e-12,
        "linear_mean": np.broadcast_to(decisions.mean(axis), c).copy(),
        "linear_std": np.broadcast_to(decisions.std(axis), c) + 1e-12,
    }
    tried, per_class = {}, {}
    for w in weights:
        fused = Fusion(pool, coef, intercept, **stats, weight=float(w))
        scores = fused.combine(head_scores, decisions)
        ap07 = np.array([voc_ap(scores[:, k], labels[:, k]) for k in range(len(coef))])
        # the held-out split's own table already warned of classes without positives, by their names
        tried[float(w)], per_class[float(w)] = mean_ap(ap07, warn=False), ap07
    best = max(tried, key=lambda w: (np.nan_to_num(tried[w], nan=-1.0), -w))  # ties: the smaller weight
    if shrink is None:
        return Fusion(pool, coef, intercept, **stats, weight=best), tried
    if shrink < 0:
        raise ValueError(f"shrink counts held-out positives: 0 or more, got {shrink}")
    grid = np.array(list(per_class))
    aps = np.nan_to_num(np.stack([per_class[w] for w in grid]), nan=-1.0)  # (W, C)
    # ties (and classes without an AP): the weight nearest the shared one
    own = grid[np.lexsort((np.broadcast_to(np.abs(grid - best)[:, None], aps.shape), -aps), axis=0)[0]]
    n = (labels == 1).sum(0)
    shrunk = np.where(n + shrink > 0, (n * own + shrink * best) / np.maximum(n + shrink, 1e-12), best)
    return Fusion(pool, coef, intercept, **stats, weight=shrunk), tried
