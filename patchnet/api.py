"""The Python API: a trained checkpoint as one object that predicts, draws score maps and localises.

    import patchnet
    model = patchnet.load("checkpoints/demo/best.pt")
    model.predict(["photo.jpg", pil_image, tensor_batch])   # per-class probabilities and raw scores
    model.score_maps("photo.jpg")                           # class -> (H, W) map of where it was found
    model.explain("photo.jpg")                              # both from one pass, beside the image as read
    model.localize("photo.jpg")                             # boxes with scores

The command line calls the same object (``patchnet predict``, ``patchnet localize``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from .checkpoint import CheckpointError
from .data import DatasetError, load_image
from .errors import PatchnetError
from .evaluation.localize import Detection, box_options, confidence, localize
from .evaluation.maps import score_map
from .evaluation.predictor import Prediction, Predictor
from .evaluation.scoring import InferOptions


class ThresholdError(PatchnetError, ValueError):
    """A probability threshold outside [0, 1]."""


def as_image(image, max_pixels: int | None = None) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a path, a PIL image, an (H, W, 3) array (uint8, uint16, or float in [0, 1])
    or a (3, H, W) tensor (uint8, or float in [0, 1])."""
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels)
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise DatasetError(f"an image tensor must be (3, H, W) (or a batch (B, 3, H, W)); got {tuple(image.shape)}")
        x = image.detach().cpu()
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round()
        return x.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DatasetError(f"an image array must be (H, W, 3) RGB; got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.asarray(_unit_range(array) * 255).round().astype(np.uint8)
    return array


def _unit_range(array: np.ndarray) -> np.ndarray:
    """A non-uint8 image array in [0, 1], as the decoder maps files: floats clipped to [0, 1], 16-bit by [0, 65535];
    other integers as 8-bit values, refused outside [0, 255] (they would wrap around)."""
    if array.dtype.kind == "f":
        return np.clip(np.nan_to_num(array, nan=0.0), 0, 1)
    if array.dtype == np.uint16:
        return array / 65535
    if array.dtype.kind not in "iub":
        raise DatasetError(f"an image array must hold numbers; got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DatasetError(
            f"an image array of dtype {array.dtype} must hold 0..255 (uint8 values), or be uint16 or float in [0, 1]; "
            f"got values in [{array.min()}, {array.max()}]"
        )
    return array / 255


def _images(images) -> list:
    """A list of single images from one image, a list of them, or a (B, 3, H, W) batch."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


@dataclass
class Predictions:
    """The classes of several images: raw pooled ``scores`` and, where the checkpoint carries a calibration,
    ``probabilities`` and the classes judged ``present`` (above each class's threshold). Rows follow the input."""

    classes: list[str]
    scores: np.ndarray  # (N, C)
    probabilities: np.ndarray | None  # (N, C)
    present: np.ndarray | None  # (N, C) bool

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: int | slice) -> Predictions:
        """The predictions of one image (``p[0]``, ``p[-1]``) or of a slice of them (``p[1:3]``), as Predictions."""
        if isinstance(index, slice):
            rows = index
        else:
            i, n = operator.index(index), len(self)
            if not -n <= i < n:
                raise IndexError(f"image {i} of predictions for {n} images")
            rows = slice(i % n, i % n + 1)
        return Predictions(
            self.classes,
            self.scores[rows],
            None if self.probabilities is None else self.probabilities[rows],
            None if self.present is None else self.present[rows],
        )

    def __iter__(self):
        """One-image Predictions, in the order of the input."""
        return (self[i] for i in range(len(self)))

    def top(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per image, its ``k`` best classes with their probability (or score)."""
        shown = self.scores if self.probabilities is None else self.probabilities
        return [[(self.classes[c], float(row[c])) for c in np.argsort(-row)[:k]] for row in shown]

    def to_dict(self) -> list[dict]:
        out = []
        for n in range(len(self)):
            row = {c: {"score": float(self.scores[n, i])} for i, c in enumerate(self.classes)}
            if self.probabilities is not None and self.present is not None:
                for i, c in enumerate(self.classes):
                    row[c].update(probability=float(self.probabilities[n, i]), present=bool(self.present[n, i]))
            out.append(row)
        return out

    def __repr__(self) -> str:
        rows = ", ".join("[" + ", ".join(f"{c} {p:.3f}" for c, p in top) + "]" for top in self.top())
        return f"Predictions({len(self)} images, top classes: {rows})"


@dataclass
class Explanation:
    """One image as ``Model.explain`` saw it: the RGB ``image`` it read, its one-image ``predictions``, and
    ``maps``: class -> (H, W) score map (the size of ``image``) of the classes judged present."""

    image: np.ndarray
    predictions: Predictions
    maps: dict[str, np.ndarray]
    boxes: list[Detection] = field(default_factory=list)  # the detection head's, where the checkpoint has one


class Model:
    """A trained patchnet checkpoint: its frozen backbone, head, pooling, fusion and calibration.

    ``options``: how it scores (``InferOptions``: device, precision, patch mode, pooling, fusion, the score
    maps' prior; default: as the checkpoint's recipe says).
    """

    def __init__(self, checkpoint: str | Path, options: InferOptions | None = None):
        self.predictor = Predictor(checkpoint, options)
        self.classes: list[str] = list(self.predictor.classes)
        self.recipe = self.predictor.recipe

    def __repr__(self) -> str:
        p, names = self.predictor, self.classes
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        pool = f"{p.pool} k={self.recipe.pool.k:g}" if p.pool == "power" else p.pool
        return (
            f"Model({p.state_path}: {len(names)} classes ({shown}), backbone {self.recipe.backbone.name}, "
            f"pooling {pool}, {'fused with its max-pool classifier' if p.fusion else 'not fused'}, "
            f"{'calibrated' if p.calibration else 'not calibrated'}, on {p.extractor.device})"
        )

    def _one(self, image, keep_maps: list | None = None) -> tuple[np.ndarray, Prediction]:
        array = as_image(image, self.recipe.data.max_pixels)
        return array, self.predictor.predict(array, keep_maps)

    def check_threshold(self, threshold: float | None) -> None:
        """Refuse a threshold (a calibrated probability) outside [0, 1], or any where the model has no probabilities."""
        if threshold is None:
            return
        if not 0.0 <= threshold <= 1.0:
            raise ThresholdError(f"a threshold is a probability and must lie in [0, 1], got {threshold:g}")
        if self.predictor.calibration is None:
            raise CheckpointError(
                f"{self.predictor.state_path} carries no calibration for pooling {self.predictor.pool}, so it has no "
                "probabilities to compare with a threshold; leave the threshold out, or use the model's own pooling"
            )

    def _predictions(self, results: list[Prediction], threshold: float | None = None) -> Predictions:
        """Predictions of scored images; ``threshold``: present = probability >= threshold instead of the
        checkpoint's per-class thresholds."""
        calibrated = bool(results) and results[0].probabilities is not None
        # a calibrated checkpoint gives every image probabilities and present flags
        probabilities = np.stack([cast(np.ndarray, r.probabilities) for r in results]) if calibrated else None
        present = np.stack([cast(np.ndarray, r.present) for r in results]) if calibrated else None
        if threshold is not None and probabilities is not None:
            present = probabilities >= threshold
        return Predictions(
            self.classes,
            np.stack([r.scores for r in results]) if results else np.zeros((0, len(self.classes))),
            probabilities,
            present,
        )

    def predict(self, images, threshold: float | None = None) -> Predictions:
        """Per-class scores (and calibrated probabilities) of one image or several: paths, PIL images, (H, W, 3)
        arrays, (3, H, W) tensors or a (B, 3, H, W) batch. ``threshold``: judge a class present where its
        probability reaches it (default: the checkpoint's per-class thresholds)."""
        self.check_threshold(threshold)
        return self._predictions([self._one(image)[1] for image in _images(images)], threshold)

    def class_indices(self, classes: list[str]) -> list[int]:
        """The indices of class names; an unknown name is an error that lists the valid ones."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            names = ", ".join(self.classes)
            raise DatasetError(f"unknown class name(s) {', '.join(unknown)}; valid names: {names}")
        return [self.classes.index(c) for c in classes]

    def _class_indices(
        self, wanted: list[int] | None, prediction: Prediction, present: np.ndarray | None = None
    ) -> list[int]:
        """``wanted`` (from ``class_indices``), or the classes judged present (``present``, else the prediction's)."""
        if wanted is not None:
            return wanted
        present = prediction.present if present is None else present
        if present is not None and present.any():
            return [int(c) for c in np.flatnonzero(present)]
        # nothing judged present: the best class, as ``Predictions.top`` ranks them (by probability where calibrated)
        return [int(np.argmax(prediction.scores if prediction.probabilities is None else prediction.probabilities))]

    def explain(
        self, image, classes: list[str] | None = None, threshold: float | None = None, prior: float | None = None
    ) -> Explanation:
        """One image scored once: its predictions and the score map of each class judged present (or of
        ``classes``; the best class where none is), beside the image as the model read it."""
        wanted = None if classes is None else self.class_indices(classes)  # checked before the model runs
        self.check_threshold(threshold)
        trunk_maps: list | None = [] if self.predictor.detector is not None else None  # for the boxes
        array, p = self._one(image, trunk_maps)
        predictions = self._predictions([p], threshold)
        prior = self.predictor.map_prior(prior)
        chosen = self._class_indices(wanted, p, None if predictions.present is None else predictions.present[0])
        maps = {self.classes[c]: score_map(p.boxes, p.values[:, c], p.width, p.height, prior=prior) for c in chosen}
        boxes = (
            [_detection(*found) for found in self.predictor.detect(array, chosen, maps=trunk_maps)]
            if self.predictor.detector is not None
            else []
        )
        return Explanation(array, predictions, maps, boxes)

    def score_maps(
        self, image, classes: list[str] | None = None, prior: float | None = None, threshold: float | None = None
    ) -> dict[str, np.ndarray]:
        """class -> (H, W) map of one image: at each pixel the mean value of the patches covering it (the
        classes judged present, or ``classes``)."""
        return self.explain(image, classes, threshold, prior).maps

    def localize(
        self, image, classes: list[str] | None = None, method: str | None = None, threshold: float | None = None
    ) -> list[Detection]:
        """Boxes of one image (``patchnet.evaluation.localize``): for the classes judged present, or ``classes``."""
        wanted = None if classes is None else self.class_indices(classes)  # checked before the model runs
        method, threshold = box_options(self.recipe.infer, method, threshold, self.predictor.detector is not None)
        trunk_maps: list | None = [] if method == "mil" else None  # for the detection head
        array, p = self._one(image, trunk_maps)
        if method == "mil":  # the detection head's boxes, scored by their regions' refined class scores
            chosen = self._class_indices(wanted, p)
            return [_detection(*found) for found in self.predictor.detect(array, chosen, maps=trunk_maps)]
        # box scores are log-confidences in [0, 1]: the calibrated probability, else the squashed pooled score
        pr = self.predictor
        sure = confidence(p.scores, pr.pool, self.recipe.pool.k, pr.calibration, pr.fusion is not None)
        scores = np.log(np.maximum(sure, 1e-300))
        return localize(
            p.boxes,
            p.values,
            scores,
            p.width,
            p.height,
            self._class_indices(wanted, p),
            method,
            threshold,
            self.predictor.map_prior(),
        )


def _detection(class_index: int, box: np.ndarray, score: float) -> Detection:
    return Detection(class_index, (float(box[0]), float(box[1]), float(box[2]), float(box[3])), score)


def load(
    checkpoint: str | Path,
    device: str | None = None,
    pool: str | None = None,
    fuse: bool = True,
    precision: str | None = None,
    options: InferOptions | None = None,
) -> Model:
    """A trained checkpoint (``best.pt`` or ``last.pt``, or a shipped model's name) ready to predict, draw score
    maps and localise.

    ``device``: cpu, cuda, cuda:N (default: the checkpoint's recipe's, auto); ``pool``: score images by another
    pooling than the model's own; ``fuse``: add the checkpoint's max-pool classifier; ``precision``: the
    trunk's (auto, fp32, bf16, fp16; default the recipe's). ``options``: all of them (and the patch mode, the
    power k, the score maps' prior) as one ``InferOptions``; the keywords given override it.
    """
    o = options or InferOptions()
    o = replace(
        o,
        device=o.device if device is None else device,
        pool=o.pool if pool is None else pool,
        precision=o.precision if precision is None else precision,
        fuse=o.fuse and fuse,
    )
    return Model(checkpoint, o)
