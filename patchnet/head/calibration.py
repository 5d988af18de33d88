"""Scores a person can read: per-class Platt scaling of pooled image scores, and decision thresholds.

Both are fitted on held-out training images (``train.holdout``), never on a reported split.
A power-k mean is a tiny positive number (``cat 0.055`` for an obvious cat), so it is calibrated
on its logarithm; evidence poolings give logits and are calibrated as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def score_feature(scores: np.ndarray, pool: str) -> np.ndarray:
    """The monotone transform of raw pooled scores that Platt scaling is linear in."""
    scores = np.asarray(scores, np.float64)
    return np.log(np.maximum(scores, 1e-300)) if pool == "power" else scores


def fit_platt(x: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(a, b) maximising the likelihood of ``P(y=1|x) = sigmoid(a x + b)`` with Platt's smoothed targets.

    Newton's method on the two parameters; ``y`` in {1, -1} (0, difficult, is left out by the caller).
    """
    x, pos = np.asarray(x, np.float64), np.asarray(y) == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Platt scaling needs positive and negative examples")
    # Platt (1999): targets pulled off 0 and 1, so that separable data give finite parameters
    t = np.where(pos, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    mu, sd = x.mean(), x.std() or 1.0
    z = (x - mu) / sd
    a, b = 1.0, float(np.log((n_pos + 1) / (n_neg + 1)))
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(a * z + b, -60, 60)))  # no overflow warning on separable data
        g = np.array([np.sum((p - t) * z), np.sum(p - t)])
        w = p * (1 - p) + 1e-12
        h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a / sd), float(b - a * mu / sd)


def best_threshold(probs: np.ndarray, y: np.ndarray) -> float:
    """The probability threshold with the highest F1 on (probs, y in {1, -1}); 0.5 without positives."""
    probs, pos = np.asarray(probs, np.float64), np.asarray(y) == 1
    if not pos.any():
        return 0.5
    order = np.argsort(-probs, kind="mergesort")
    tp = np.cumsum(pos[order])
    f1 = 2 * tp / (np.arange(1, len(probs) + 1) + pos.sum())
    last_of_tie = np.r_[probs[order][1:] != probs[order][:-1], True]
    f1 = np.where(last_of_tie, f1, -1)  # a threshold cannot split tied scores
    i = int(np.argmax(f1))
    below = probs[order][i + 1] if i + 1 < len(probs) else 0.0
    return float((probs[order][i] + below) / 2)  # midway to the next score: robust to small shifts


@dataclass
class Calibration:
    """Per-class ``P(c) = sigmoid(a * f(score) + b)`` and the probability above which c is reported present."""

    pool: str
    a: np.ndarray
    b: np.ndarray
    threshold: np.ndarray
    fused: bool = False  # fitted on fused scores (patchnet.studies.linear.Fusion), which are z-scores already

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        z = self.a * (scores if self.fused else score_feature(scores, self.pool)) + self.b
        return 1 / (1 + np.exp(-np.clip(z, -60, 60)))

    def to_dict(self) -> dict:
        return {
            "pool": self.pool,
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "threshold": self.threshold.tolist(),
            "fused": self.fused,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(
            d["pool"],
            np.asarray(d["a"], np.float64),
            np.asarray(d["b"], np.float64),
            np.asarray(d["threshold"], np.float64),
            bool(d.get("fused", False)),
        )


def calibrate(
    scores: np.ndarray, labels: np.ndarray, pool: str, fused: bool = False, shared: bool = False
) -> Calibration:
    """Fit one Platt scaling and one F1-best threshold per class on held-out (N, C) scores and 1/-1/0 labels.

    A class without both positive and negative held-out images keeps the identity map on its
    transformed score and a threshold of 0.5. ``shared``: one Platt scaling for every class, fitted on all
    of them, which keeps the classes' order (single-label data: a few held-out images per class would
    otherwise reorder them).
    """
    x = np.asarray(scores, np.float64) if fused else score_feature(scores, pool)
    n = x.shape[1]
    a, b, thr = np.ones(n), np.zeros(n), np.full(n, 0.5)
    known = labels != 0
    if shared and (labels[known] == 1).any() and (labels[known] == -1).any():
        a[:], b[:] = fit_platt(x[known], labels[known])
    for c in range(n):
        keep = labels[:, c] != 0
        y = labels[keep, c]
        if (y == 1).any() and (y == -1).any():
            if not shared:
                a[c], b[c] = fit_platt(x[keep, c], y)
            p = 1 / (1 + np.exp(-np.clip(a[c] * x[keep, c] + b[c], -60, 60)))
            thr[c] = best_threshold(p, y)
    return Calibration(pool, a, b, thr, fused)
