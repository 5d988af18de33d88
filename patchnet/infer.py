"""Scoring with a trained head: image scores through the pooling family, evaluation, prediction, score maps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .backbones import BackboneError, backbone_spec, build_backbone, unlock_split
from .calibration import Calibration
from .checkpoint import Checkpoint, CheckpointError, check_compatible, load_checkpoint, load_head
from .codec import FeatureCodec
from .datasets import DatasetError, data_override, load_image, open_split
from .extract import PatchExtractor, build_extractor
from .features import build_features, cache_spec
from .fusion import Fusion
from .metrics import APTable, PointingResult, ap_table, point_hits, union_fraction
from .model import AdaptationHead
from .models import resolve_checkpoint
from .pooling import map_values, pool_features, pool_image, pool_items
from .recipe import PoolConfig, Recipe, recipe_from_dict
from .store import damaged
from .unlock import load_unlocked


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


@dataclass
class Prediction:
    scores: np.ndarray  # (C,) pooled image scores
    probabilities: np.ndarray | None  # (C,) calibrated P(class present), when the checkpoint carries a calibration
    present: np.ndarray | None  # (C,) bool: above the class's decision threshold
    boxes: np.ndarray  # (N, 4) patches
    values: np.ndarray  # (N, C) per-patch values for score maps, in [0, 1]
    width: int
    height: int


class Predictor:
    """A trained checkpoint, ready to score images with its own pooling (or ``pool``)."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = None,
        mode: str | None = None,
        pool: str | None = None,
        k: float | None = None,
        fuse: bool = True,
        precision: str | None = None,
    ):
        self.state, self.state_path = load_checkpoint(checkpoint), resolve_checkpoint(checkpoint)
        overrides = [f"runtime.device={device}"] if device else []
        if precision:
            overrides.append(f"backbone.precision={precision}")
        if mode:
            overrides.append(f"patches.mode={mode}")
        if pool:
            overrides.append(f"infer.pool={pool}")
        if k is not None:
            overrides.append(f"pool.k={k}")
        self.recipe: Recipe = recipe_from_dict(self.state.recipe, overrides)
        self.classes: list[str] = list(self.state.classes)
        self.extractor = checkpoint_extractor(self.state, checkpoint, self.recipe)
        # the head reads features stored as in training: through the checkpoint's projection and quantisation
        self.codec = FeatureCodec.from_state(self.state.codec)
        dim = self.codec.dim(self.extractor.feature_dim)
        self.head = AdaptationHead(dim, len(self.classes), **asdict(self.recipe.head))
        load_head(self.head, self.state.head, checkpoint)
        self.head.eval()
        self.pool = self.recipe.infer_pool
        fusion = self.state.fusion
        # a fusion (and the calibration fitted on its scores) holds for the pooling it was fitted with
        self.fusion = (
            Fusion.from_dict(fusion)
            if fuse and fusion and fusion["pool"] == self.pool and self._same_k(fusion)
            else None
        )
        cal = self.state.calibration
        # a calibration holds for the pooling (and power) it was fitted on
        self.calibration = (
            Calibration.from_dict(cal)
            if cal
            and cal["pool"] == self.pool
            and self._same_k(cal)
            and bool(cal.get("fused")) == (self.fusion is not None)
            else None
        )

    def _same_k(self, fitted: dict) -> bool:
        return self.pool != "power" or fitted.get("k", self.recipe.pool.k) == self.recipe.pool.k

    def score(self, logits: torch.Tensor, features) -> np.ndarray:
        """(C,) score of one image from its (N, C + 1) patch logits and (N, d) patch features (as stored)."""
        scores = pool_image(logits, self.recipe.pool, self.pool)
        if self.fusion is None:
            return scores
        pooled = self.codec.unproject(features).max(0, keepdims=True)
        return self.fusion.combine(scores[None], self.fusion.decision(pooled))[0]

    def map_values(self, logits: torch.Tensor) -> np.ndarray:
        return map_values(logits, self.pool).numpy()

    def predict(self, image) -> Prediction:
        """Score one image: a path or an RGB uint8 (H, W, 3) array."""
        if isinstance(image, (str, Path)):
            image = load_image(image, self.recipe.data.max_pixels)
        h, w = image.shape[:2]
        features, plan = self.extractor.extract(image)
        return self.predict_features(self.codec.roundtrip(features), plan.boxes, w, h)

    def predict_features(self, features, boxes: np.ndarray, width: int, height: int) -> Prediction:
        """Score one image from its patch features as the cache stores them (``FeatureStore.rows``, or the
        extractor's output through ``self.codec.roundtrip``)."""
        logits = self.head.logits(features)
        scores = self.score(logits, features)
        probs = self.calibration.probabilities(scores) if self.calibration else None
        present = probs >= self.calibration.threshold if self.calibration else None
        return Prediction(scores, probs, present, np.asarray(boxes), self.map_values(logits), width, height)


def checkpoint_extractor(state: Checkpoint, path: str | Path, recipe: Recipe) -> PatchExtractor:
    """The extractor that scores images for a checkpoint: its recipe's backbone, checked against it, with the
    trained stages of ``train.unlock`` loaded before the extractor folds BatchNorm into them."""
    b = recipe.backbone
    backbone = build_backbone(b.name, b.weights, b.input_size, b.layer)
    check_compatible(state, path, b.name, list(state.classes), backbone.feature_dim, backbone.weights_id)
    if recipe.train.unlock:
        if state.trunk is None:
            raise CheckpointError(
                f"{path}: its recipe unlocks {recipe.train.unlock} trunk stages, but it carries no "
                "trained stages (trunk); it is not a complete patchnet checkpoint"
            )
        try:
            load_unlocked(backbone, state.trunk, unlock_split(backbone_spec(b.name), recipe.train.unlock))
        except BackboneError as e:
            raise CheckpointError(f"{path}: {e}") from None
    extractor = build_extractor(recipe, backbone)
    if extractor.int8:
        if not state.int8:
            raise CheckpointError(
                f"{path}: its recipe runs an int8 trunk, but it carries no int8 ranges; it is not a complete "
                "patchnet checkpoint (use precision='fp32' or 'bf16' to score with a float trunk)"
            )
        extractor.use_int8(state.int8)
    return extractor


def evaluate_split(
    checkpoint: str | Path,
    data: str | Path | None = None,
    split: str | None = None,
    fmt: str | None = None,
    mode: str | None = None,
    pool: str | None = None,
    k: float | None = None,
    fuse: bool = True,
    progress: bool = True,
    device: str | None = None,
    boxes: bool = False,
):
    """Scores of a checkpoint on a split (default: its recipe's validation split), its trunk on ``device``
    (default: the recipe's runtime.device).

    ``boxes``: read the split's boxes even where the checkpoint was trained without them (``data.boxes:
    false``), for the pointing game and localisation; the AP table does not depend on them.

    Returns the AP table, the number of images scored, and the (predictor, dataset, store, items,
    scores) behind them for further use (the pointing game, localisation).
    """
    predictor = Predictor(checkpoint, device=device, mode=mode, pool=pool, k=k, fuse=fuse)
    recipe = predictor.recipe
    recipe.data = data_override(recipe.data, data, fmt)
    if boxes:
        recipe.data = replace(recipe.data, boxes=True)
    split = split or recipe.data.val_split
    if not split:
        raise DatasetError("no split given and the recipe has no data.val_split; pass --split")
    dataset = open_split(recipe.data, split, classes=predictor.classes)
    if dataset.classes != predictor.classes:
        raise CheckpointError(
            f"{checkpoint}: trained for classes {predictor.classes}, but {dataset.name} has {dataset.classes}"
        )
    store = build_features(
        cache_spec(recipe, predictor.extractor, codec=predictor.codec), dataset, predictor.extractor, progress=progress
    )
    items = evaluation_items(store)
    table, scores = evaluate(predictor.head, store, dataset, items, recipe.pool, predictor.pool, predictor.fusion)
    return table, len(items), (predictor, dataset, store, items, scores)


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
