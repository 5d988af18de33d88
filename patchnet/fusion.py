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

from .calibration import score_feature
from .metrics import ap_table
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
    weight: float

    def decision(self, pooled: np.ndarray) -> np.ndarray:
        return l2_normalize(pooled) @ self.coef.T + self.intercept

    def combine(self, head_scores: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        h = (score_feature(head_scores, self.pool) - self.head_mean) / self.head_std
        return h + self.weight * (decisions - self.linear_mean) / self.linear_std

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
) -> tuple[Fusion, dict]:
    """Choose the fusion weight by 11-point mAP on held-out (head scores, max-pooled features, labels).

    Returns the fusion and the held-out mAP of every weight tried.
    """
    decisions = l2_normalize(pooled) @ coef.T + intercept
    h = score_feature(head_scores, pool)
    stats = {
        "head_mean": h.mean(0),
        "head_std": h.std(0) + 1e-12,
        "linear_mean": decisions.mean(0),
        "linear_std": decisions.std(0) + 1e-12,
    }
    tried = {}
    for w in weights:
        fused = Fusion(pool, coef, intercept, **stats, weight=float(w))
        tried[float(w)] = ap_table(
            fused.combine(head_scores, decisions), labels, [str(i) for i in range(len(coef))]
        ).map07
    best = max(tried, key=lambda w: (np.nan_to_num(tried[w], nan=-1.0), -w))  # ties: the smaller weight
    return Fusion(pool, coef, intercept, **stats, weight=best), tried
