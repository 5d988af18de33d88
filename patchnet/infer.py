"""From patch probabilities to image scores (power-k mean) and per-pixel score maps; prediction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import build_backbone
from .cache import build_features
from .datasets import DatasetError, load_image, open_split
from .extract import PatchExtractor
from .metrics import APTable, ap_table
from .model import AdaptationHead, CheckpointError, check_compatible, load_checkpoint
from .recipe import Recipe, recipe_from_dict


def aggregate(probs, k: float) -> np.ndarray:
    """Image scores ``score(c) = (1/M) sum_i y(c|P_i)^k`` of (M, C + 1) patch probabilities.

    The background column (the last) is not scored.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64)
    return probs[:, :-1].pow(k).mean(0).numpy()


def aggregate_items(probs, offsets: np.ndarray, k: float) -> np.ndarray:
    """Power-k mean per item of (P, C + 1) probabilities, items given by ``offsets`` (I + 1,)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)[:, :-1].pow(k)
    item = torch.from_numpy(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
    sums = torch.zeros(len(offsets) - 1, probs.shape[1], dtype=torch.float64).index_add_(0, item, probs)
    counts = torch.from_numpy(np.diff(offsets)).clamp(min=1).double()[:, None]
    return (sums / counts).numpy()


def score_map(boxes: np.ndarray, values: np.ndarray, width: int, height: int, reduce: str = "mean") -> np.ndarray:
    """(H, W) map: at each pixel, the mean (or max) of ``values`` over the patches that cover it.

    A pixel is covered by a patch when its centre lies inside; uncovered pixels are 0.
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
            out[y1[i]:y2[i], x1[i]:x2[i]] = values[i]
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
    return np.where(sums[1] > 0.5, sums[0] / np.maximum(sums[1], 1), 0.0).astype(np.float32)


def score_store(head: AdaptationHead, store, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Power-k scores (I, C) of the original images (view 0) of a feature store, and which were readable."""
    probs = head.probabilities(store.features)
    scores = aggregate_items(probs, store.offsets, k)
    originals = store.view == 0
    return scores[originals], store.ok[originals]


@dataclass
class Prediction:
    scores: np.ndarray  # (C,) power-k image scores
    boxes: np.ndarray  # (N, 4) patches
    probs: np.ndarray  # (N, C + 1) patch probabilities
    width: int
    height: int


class Predictor:
    """A trained checkpoint, ready to score images."""

    def __init__(self, checkpoint: str | Path, device: str | None = None, mode: str | None = None):
        self.state = load_checkpoint(checkpoint)
        values = self.state["recipe"]
        overrides = [f"backbone.device={device}"] if device else []
        if mode:
            overrides.append(f"patches.mode={mode}")
        self.recipe: Recipe = recipe_from_dict(values, overrides)
        self.classes: list[str] = list(self.state["classes"])
        b = self.recipe.backbone
        backbone = build_backbone(b.name, b.weights, b.input_size, b.layer)
        check_compatible(self.state, checkpoint, backbone.name, self.classes, backbone.feature_dim)
        self.extractor = PatchExtractor(backbone, self.recipe.patches, self.recipe.backbone)
        self.head = AdaptationHead(backbone.feature_dim, len(self.classes), self.recipe.head.hidden,
                                   self.recipe.head.dropout)
        self.head.load_state_dict(self.state["head"])
        self.head.eval()
        self.k = self.recipe.infer.k

    def probabilities(self, features) -> np.ndarray:
        return self.head.probabilities(features).numpy()

    def predict(self, image) -> Prediction:
        """Score one image: a path or an RGB uint8 (H, W, 3) array."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        h, w = image.shape[:2]
        probs = self.probabilities(self.extractor(image))
        return Prediction(aggregate(probs, self.k), self.extractor.boxes(w, h), probs, w, h)


def evaluate_split(checkpoint: str | Path, data: str | Path | None = None, split: str | None = None,
                   fmt: str | None = None, mode: str | None = None, k: float | None = None,
                   progress: bool = True) -> tuple[APTable, int]:
    """VOC APs of a checkpoint on a split (default: its recipe's validation split); also the image count."""
    predictor = Predictor(checkpoint, mode=mode)
    if k is not None:
        predictor.k = k
    recipe = predictor.recipe
    if data is not None:
        recipe.data.root = str(data)
    if fmt is not None:
        recipe.data.format = fmt
    split = split or recipe.data.val_split
    if not split:
        raise DatasetError("no split given and the recipe has no data.val_split; pass --split")
    dataset = open_split(recipe.data, split)
    if dataset.classes != predictor.classes:
        raise CheckpointError(f"{checkpoint}: trained for classes {predictor.classes}, "
                              f"but {dataset.name} has {dataset.classes}")
    store = build_features(recipe, dataset, predictor.extractor, progress=progress)
    scores, ok = score_store(predictor.head, store, predictor.k)
    labels = dataset.labels()[store.record[store.view == 0]]
    return ap_table(scores[ok], labels[ok], dataset.classes), int(ok.sum())
