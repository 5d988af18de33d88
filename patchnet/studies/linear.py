"""Whole-image features and the "CNN features off-the-shelf" baseline (Razavian et al.; DeCAF).

Features are L2-normalised and a one-vs-rest linear SVM (or logistic regression) per class is fit
with scikit-learn; C is chosen per class by cross-validated AP on the training split, and the
result is scored by the same VOC AP code as ``patchnet eval``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from ..data import Dataset, open_split
from ..evaluation.metrics import APTable, ap_table, voc_ap
from ..features.build import build_features, cache_spec
from ..head.pooling import l2_normalize, pool_features
from ..recipe import Recipe
from ..store import FeatureStore
from ..store.codec import FeatureCodec

log = logging.getLogger("patchnet")

C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class SplitFeatures:
    """One feature row per (readable) image of a split, with its image-level labels."""

    ids: list[str]
    features: np.ndarray  # (N, d) float32
    labels: np.ndarray  # (N, C) int8
    classes: list[str]


def pool_store(store: FeatureStore, pool: str = "mean", view: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """One row per readable item of a view (None: every view): the mean or max of its patch features
    (in the trunk's space, also when the cache stores projections).

    Returns (rows, record index of each row).
    """
    keep = store.ok & ((store.view == view) if view is not None else True)
    items = np.flatnonzero(keep)
    return pool_features(store.trunk_rows, store.offsets, items, pool), store.record[items].astype(np.int64)


def split_features(
    recipe: Recipe,
    dataset: Dataset,
    extractor,
    pool: str = "mean",
    views: int = 0,
    progress: bool = True,
    codec: FeatureCodec | None = None,
) -> SplitFeatures:
    """Per-image features of a split through the feature cache; augmented views become extra rows.

    ``codec``: how the cache stores the rows; default the recipe's (``patchnet.features.build.cache_spec``).
    """
    store = build_features(
        cache_spec(recipe, extractor, codec=codec, progress=progress),
        dataset,
        extractor,
        views=views,
        progress=progress,
    )
    rows, records = pool_store(store, pool, view=None)
    return SplitFeatures(
        [dataset.records[r].image_id for r in records], rows, dataset.labels()[records], list(dataset.classes)
    )


def _classifier(method: str, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if method == "svm":
        return LinearSVC(C=C, loss="squared_hinge", dual="auto", max_iter=5000, random_state=seed)
    if method == "logreg":
        return LogisticRegression(C=C, max_iter=2000)
    raise ValueError(f"method must be svm or logreg, got {method!r}")


def cv_folds(y: np.ndarray, groups: np.ndarray | None = None, folds: int = 3, seed: int = 0) -> list:
    """Stratified (train, test) index pairs that never split a group across train and test."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.arange(len(y)) if groups is None else groups
    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def choose_c(
    x: np.ndarray,
    y: np.ndarray,
    method: str,
    grid=C_GRID,
    folds: int = 3,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> float:
    """The C of ``grid`` with the best cross-validated 11-point AP on (x, y in {1, -1}).

    Rows with one ``groups`` value (the augmented views of one image) stay in one fold, so that no
    image is scored by a classifier that saw another view of it.
    """
    if (y == 1).sum() < folds or (y == -1).sum() < folds:
        return 1.0
    best, best_ap = grid[0], -1.0
    split = cv_folds(y, groups, folds, seed)
    for C in grid:
        scores = np.zeros(len(y))
        for tr, te in split:
            model = _classifier(method, C, seed).fit(x[tr], y[tr])
            scores[te] = model.decision_function(x[te])
        ap = voc_ap(scores, y)
        if ap > best_ap:
            best, best_ap = C, ap
    return best


@dataclass
class LinearModel:
    """Per-class linear classifiers on L2-normalised features."""

    classes: list[str]
    models: list  # sklearn estimators (None for a class without both labels)
    cs: list[float]

    def decision(self, features: np.ndarray) -> np.ndarray:
        x = l2_normalize(features)
        out = np.zeros((len(x), len(self.classes)))
        for c, m in enumerate(self.models):
            if m is not None:
                out[:, c] = m.decision_function(x)
        return out


def fit_linear(
    train: SplitFeatures, method: str = "svm", grid=C_GRID, seed: int = 0, progress: bool = True
) -> LinearModel:
    """One classifier per class (labels 0, difficult-only, are left out of that class's training)."""
    x = l2_normalize(train.features)
    models: list = []  # sklearn estimators, None for a class without both labels
    cs: list[float] = []
    for c, name in enumerate(tqdm(train.classes, desc=f"linear {method}", unit="class", disable=not progress)):
        keep = train.labels[:, c] != 0
        y = train.labels[keep, c].astype(int)
        if len(set(y.tolist())) < 2:
            log.warning(
                "class %s has no %s training image: no classifier", name, "positive" if (y == -1).all() else "negative"
            )
            models.append(None)
            cs.append(float("nan"))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # liblinear's convergence chatter on hard C values
            C = (
                choose_c(x[keep], y, method, grid, seed=seed, groups=np.asarray(train.ids)[keep])
                if len(grid) > 1
                else grid[0]
            )
            models.append(_classifier(method, C, seed).fit(x[keep], y))
        cs.append(C)
    return LinearModel(list(train.classes), models, cs)


def whole_image_recipe(recipe: Recipe) -> Recipe:
    """The recipe's backbone and data, with whole-image features (the image and its mirror)."""
    return replace(recipe, patches=replace(recipe.patches, mode="whole"))


def linear_baseline(
    recipe: Recipe,
    train_split: str,
    eval_split: str,
    extractor_for,
    method: str = "svm",
    pool: str = "mean",
    views: int = 0,
    grid=C_GRID,
    progress: bool = True,
) -> tuple[APTable, LinearModel]:
    """Train per-class linear classifiers on one split and return the VOC AP table on another."""
    train_ds = open_split(recipe.data, train_split)
    eval_ds = open_split(recipe.data, eval_split, classes=train_ds.classes)
    extractor = extractor_for(recipe)
    train_f = split_features(recipe, train_ds, extractor, pool, views=views, progress=progress)
    eval_f = split_features(recipe, eval_ds, extractor, pool, progress=progress)
    model = fit_linear(train_f, method, grid, seed=recipe.train.seed, progress=progress)
    return ap_table(model.decision(eval_f.features), eval_f.labels, eval_f.classes), model


def linear_arrays(model: LinearModel, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, d) weights and (C,) biases of per-class linear models (zeros for a class without one)."""
    coef, intercept = np.zeros((len(model.models), dim)), np.zeros(len(model.models))
    for c, m in enumerate(model.models):
        if m is not None:
            coef[c], intercept[c] = np.ravel(m.coef_), float(np.ravel(m.intercept_)[0])
    return coef, intercept
