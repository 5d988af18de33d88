"""A trained checkpoint as a predictor: its recipe with the inference options resolved in (``scoring.InferOptions``),
its extractor, head, pooling, fusion and calibration, from images (or cached features) to predictions; and the
evaluation of a checkpoint on a split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..backbones import BackboneError, backbone_spec, build_backbone, unlock_split
from ..checkpoint import Checkpoint, CheckpointError, check_compatible, load_checkpoint, load_head
from ..data import DatasetError, data_override, load_image, open_split
from ..features.build import build_features, cache_spec
from ..features.extract import PatchExtractor, build_extractor
from ..head.calibration import Calibration
from ..head.fusion import Fusion
from ..head.layers import AdaptationHead
from ..head.mil import detect, image_regions, load_detector
from ..head.pooling import map_values, pool_image
from ..models import resolve_checkpoint
from ..recipe import Recipe, recipe_from_dict
from ..store.codec import FeatureCodec
from ..training.unlock import boundary_maps, load_unlocked
from .scoring import InferOptions, check_prior, evaluate, evaluation_items


@dataclass
class Prediction:
    """One image scored: its pooled scores (calibrated where the checkpoint can), and its patches' values for maps."""

    scores: np.ndarray  # (C,) pooled image scores
    probabilities: np.ndarray | None  # (C,) calibrated P(class present), when the checkpoint carries a calibration
    present: np.ndarray | None  # (C,) bool: above the class's decision threshold
    boxes: np.ndarray  # (N, 4) patches
    values: np.ndarray  # (N, C) per-patch values for score maps, in [0, 1]
    width: int
    height: int


class Predictor:
    """A trained checkpoint, ready to score images as its recipe says, with ``options`` (an ``InferOptions``)
    resolved into that recipe: ``self.recipe`` is then the one place to read how it scores."""

    def __init__(self, checkpoint: str | Path, options: InferOptions | None = None):
        self.options = options or InferOptions()
        self.state, self.state_path = load_checkpoint(checkpoint), resolve_checkpoint(checkpoint)
        self.recipe: Recipe = self.options.resolve(recipe_from_dict(self.state.recipe))
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
            if self.options.fuse and fusion and fusion["pool"] == self.pool and self._same_k(fusion)
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

        detector = self.state.detector
        self.detector = (
            load_detector(detector, self.extractor.feature_dim, len(self.classes), self.recipe.detector).to(
                self.extractor.device
            )
            if detector
            else None
        )
        self.geometry = {k: detector[k] for k in ("stride", "offset", "input_size")} if detector else {}

    def detect(
        self, image: np.ndarray, classes, max_boxes: int = 5, maps: list | None = None
    ) -> list[tuple[int, np.ndarray, float]]:
        """Boxes of ``classes`` in one RGB uint8 (H, W, 3) image from the detection head (``train.detector: mil``),
        after class-wise NMS, as (class, box, score in [0, 1]): the best ``max_boxes`` of each class, as many as
        the score map's method gives (detection AP reads ``detector.max_boxes``, 100, from the map cache).
        ``maps``: the trunk's maps of the image kept by ``predict`` (else the trunk runs here)."""
        if self.detector is None:
            raise CheckpointError(
                f"{self.state_path}: this checkpoint has no detection head (it was trained with train.detector: "
                "none); use the box method map, or train with --set train.detector=mil"
            )
        h, w = image.shape[:2]
        if maps:
            levels, factors = [m for m, _ in maps], np.array([f for _, f in maps], np.float64)
        else:
            found = boundary_maps(self.extractor, image, None)
            levels, factors = found.maps, found.factors
        regions = image_regions(
            levels, factors, w, h, self.recipe.detector, device=self.extractor.device, **self.geometry
        )
        cfg = replace(self.recipe.detector, max_boxes=max_boxes)
        return detect(self.detector, regions, cfg, classes, self.extractor.autocast_dtype)[0]

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

    def map_prior(self, prior: float | None = None) -> float:
        """The score maps' prior: ``prior`` for one call where given (checked as ``InferOptions`` checks it),
        else the resolved ``infer.map_prior``."""
        return self.recipe.infer.map_prior if prior is None else check_prior(prior)

    def predict(self, image, keep_maps: list | None = None) -> Prediction:
        """Score one image: a path or an RGB uint8 (H, W, 3) array (``keep_maps``: see ``PatchExtractor.extract``)."""
        if isinstance(image, (str, Path)):
            image = load_image(image, self.recipe.data.max_pixels)
        h, w = image.shape[:2]
        features, plan = self.extractor.extract(image, keep_maps)
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
    options: InferOptions | None = None,
    progress: bool = True,
    boxes: bool = False,
    cache_dir: str | Path | None = None,
):
    """Scores of a checkpoint on a split (default: its recipe's validation split), scored with ``options``.

    ``boxes``: read the split's boxes even where the checkpoint was trained without them (``data.boxes:
    false``), for the pointing game and localisation; the AP table does not depend on them. ``cache_dir``:
    the feature cache's folder (default: the recipe's ``runtime.cache_dir``).

    Returns the AP table, the number of images scored, and the (predictor, dataset, store, items,
    scores) behind them for further use (the pointing game, localisation).
    """
    predictor = Predictor(checkpoint, options)
    recipe = predictor.recipe
    recipe.data = data_override(recipe.data, data, fmt)
    if cache_dir is not None:
        recipe.runtime.cache_dir = str(cache_dir)
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
