"""Patch scores to image scores: the options a trained model scores with, resolved once against its recipe, and the
pooled (optionally fused) image scores of a feature store's items with the evaluation built on them.

``InferOptions`` is the one home of the inference options (device, precision, patch mode, pooling and its power,
fusion, the score maps' prior): the API, the CLI, export, the TensorBoard heatmaps and ``tools/`` build one and
pass it on as an object; ``resolve`` writes it into the checkpoint's recipe, checked as a recipe is, and every
later reader takes the value from that recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..head.fusion import Fusion
from ..head.layers import AdaptationHead
from ..head.pooling import pool_features, pool_items
from ..recipe import PoolConfig, Recipe, RecipeError, merge_values, recipe_from_dict
from ..store import damaged
from .metrics import APTable, ap_table


@dataclass(frozen=True)
class InferOptions:
    """How a trained model scores images; None: as its recipe says.

    ``device``: cpu, cuda, cuda:N or auto (``runtime.device``); ``precision``: the trunk's arithmetic, auto,
    fp32, bf16, fp16 or int8 (``backbone.precision``); ``mode``: exact or shared patch features
    (``patches.mode``); ``pool``: the pooling that scores images (``infer.pool``) and ``k`` its power
    (``pool.k``); ``fuse``: add the checkpoint's fused max-pool classifier, if any; ``map_prior``: the score
    maps' pseudo-patches of the image mean (``infer.map_prior``).
    """

    device: str | None = None
    precision: str | None = None
    mode: str | None = None
    pool: str | None = None
    k: float | None = None
    fuse: bool = True
    map_prior: float | None = None

    def __post_init__(self) -> None:
        if self.map_prior is not None:
            check_prior(self.map_prior)

    def values(self) -> dict[str, Any]:
        """The options given, as recipe values (section -> field -> value)."""
        fields = {
            ("runtime", "device"): self.device,
            ("backbone", "precision"): self.precision,
            ("patches", "mode"): self.mode,
            ("infer", "pool"): self.pool,
            ("pool", "k"): self.k,
            ("infer", "map_prior"): self.map_prior,
        }
        out: dict[str, Any] = {}
        for (section, name), value in fields.items():
            if value is not None and value != "":
                out.setdefault(section, {})[name] = value
        return out

    def resolve(self, recipe: Recipe) -> Recipe:
        """A copy of ``recipe`` with these options in it, type-checked and validated as a recipe read from YAML
        (an unknown pooling or precision is the same ``RecipeError``)."""
        return recipe_from_dict(merge_values(recipe.to_dict(), self.values()))


def check_prior(prior: float) -> float:
    """A score-map prior, refused unless a count of pseudo-patches (at least 0); returns it as a float."""
    if not prior >= 0:  # NaN too
        raise RecipeError(f"the map prior counts pseudo-patches of the image mean and must be at least 0, got {prior}")
    return float(prior)


def image_scores(
    head: AdaptationHead, store, items: np.ndarray, cfg: PoolConfig, pool: str, fusion: Fusion | None = None
) -> np.ndarray:
    """(len(items), C) pooled scores of items of a feature store (fused with the max-pool classifier if given)."""
    scores = pool_items(head, store.rows, store.offsets, cfg, pool, items)
    if fusion is not None:
        scores = fusion.combine(scores, fusion.decision(pool_features(store.trunk_rows, store.offsets, items, "max")))
    if not np.isfinite(scores).all():
        _explain_non_finite(head, store, np.asarray(items)[~np.isfinite(scores).all(1)])
    return scores


def _explain_non_finite(head: AdaptationHead, store, items: np.ndarray) -> None:
    """Non-finite image scores: a damaged cache when the items' features are not finite, else the head."""
    for i in items:
        if not np.isfinite(store.rows[store.item_slice(int(i))]).all():
            raise damaged(store.path, f"the features of record {store.record[i]} (and perhaps others) are not finite")
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise CheckpointError(
            "the head's weights hold NaN or inf values: the checkpoint is damaged or its training "
            "diverged; train it again (a lower train.lr)"
        )
    raise CheckpointError(
        f"{len(items)} images scored NaN or inf from finite features and weights: the scores overflow "
        "(try another pooling, e.g. --pool power)"
    )


def evaluation_items(store, records: np.ndarray | None = None) -> np.ndarray:
    """The store items that are scored: readable originals (view 0), optionally of the given records only."""
    keep = (store.view == 0) & store.ok
    if records is not None:
        keep &= np.isin(store.record, records)
    return np.flatnonzero(keep)


def evaluate(
    head: AdaptationHead, store, dataset, items: np.ndarray, cfg: PoolConfig, pool: str, fusion: Fusion | None = None
) -> tuple[APTable, np.ndarray]:
    """VOC APs (and accuracy for single-label data) of store ``items``; also their (I, C) scores.

    The one evaluation path: training-time selection, the final report and ``patchnet eval``.
    """
    scores = image_scores(head, store, items, cfg, pool, fusion)
    labels = dataset.labels()[store.record[items]]
    return ap_table(scores, labels, dataset.classes, single_label=dataset.single_label), scores
