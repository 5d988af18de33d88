"""The one record type every reader produces, the split that holds them, and the repairs counted on the way."""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..files import digest
from .images import MAX_PIXELS, DatasetError, ImageTooLarge, image_size

log = logging.getLogger("patchnet")


@dataclass
class ImageRecord:
    """One image with its boxes (pixel ``x1, y1, x2, y2``, continuous coordinates) and image-level labels."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32
    box_classes: np.ndarray  # (K,) int64
    box_difficult: np.ndarray  # (K,) bool
    labels: np.ndarray  # (C,) int8: 1 present, -1 absent, 0 present only as difficult

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass
class Dataset:
    """A split: its class list, its records, and the fixes made while reading (kind -> files)."""

    name: str
    classes: list[str]
    records: list[ImageRecord]
    fixes: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[str, Path] = {}
        for r in self.records:  # every output keyed by image id (heatmaps, retrieval, JSON) needs them distinct
            if r.image_id in seen:
                raise DatasetError(
                    f"{self.name}: two records share the image id {r.image_id!r} "
                    f"({seen[r.image_id]} and {r.path}); each image must be listed once"
                )
            seen[r.image_id] = r.path

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_boxes(self) -> bool:
        return any(len(r.boxes) for r in self.records)

    @property
    def single_label(self) -> bool:
        """Every image has exactly one class (image folders, MIT-67 style): accuracy is reported too."""
        return bool(self.records) and bool(((self.labels() == 1).sum(1) == 1).all())

    @functools.cached_property
    def images_digest(self) -> str:
        """Names the images (ids, resolved paths, file sizes, sizes): computed once per split, for cache keys."""
        return digest(
            [(r.image_id, str(r.path.resolve()), r.path.stat().st_size, r.width, r.height) for r in self.records]
        )

    @functools.cached_property
    def annotations_digest(self) -> str:
        """Names every box of every image (augmented views carry transformed boxes)."""
        return digest([(r.boxes.tolist(), r.box_classes.tolist(), r.box_difficult.tolist()) for r in self.records])

    def labels(self) -> np.ndarray:
        """Image-level labels, (N, C) int8."""
        return np.stack([r.labels for r in self.records]) if self.records else np.zeros((0, len(self.classes)), np.int8)


class Fixes:
    """Counts the repairs and skips made while reading input data, and logs one line per kind."""

    MESSAGES: ClassVar[dict[str, str]] = {
        "clipped": "boxes extending outside their image were clipped",
        "dropped": "zero-area boxes were dropped",
        "resized": "images whose real size differs from the annotation: the real size is used",
        "unreadable": "images cannot be decoded; they are skipped when features are computed",
        "skipped": "unreadable images without an annotated size were left out",
        "too_large": "images exceed data.max_pixels (or Pillow's decompression-bomb limit) and were left out "
        "undecoded; raise data.max_pixels to read them",
        "duplicate": "duplicate entries (the same image with the same labels) were dropped",
        "unused_category": "categories that no annotation uses were dropped (set data.classes to keep them)",
    }

    def __init__(self) -> None:
        self.files: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, where: str, count: int = 1) -> None:
        if count:
            self.files[kind].extend([where] * count)

    def report(self, name: str) -> dict[str, list[str]]:
        for kind, where in self.files.items():
            log.warning("%s: %d %s (first: %s)", name, len(where), self.MESSAGES[kind], where[0])
        return dict(self.files)


def clean_boxes(boxes: np.ndarray, width: int, height: int, where: str, fixes: Fixes) -> np.ndarray:
    """Clip boxes to the image, and return the mask of those with positive area (NaN boxes have none)."""
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = np.any(clipped != boxes, axis=1) & keep
    fixes.add("clipped", where, int(moved.sum()))
    fixes.add("dropped", where, int((~keep).sum()))
    boxes[:] = clipped
    return keep


def labels_from_boxes(classes: np.ndarray, difficult: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.full(num_classes, -1, np.int8)
    labels[classes[difficult]] = 0
    labels[classes[~difficult]] = 1
    return labels


def make_record(
    image_id,
    path,
    ann_size,
    boxes,
    classes,
    difficult,
    num_classes,
    where,
    fixes: Fixes,
    labels=None,
    max_pixels: int | None = MAX_PIXELS,
) -> ImageRecord | None:
    """A record with cleaned boxes; None (counted) for an image over the pixel limit, or an unreadable one
    without an annotated size."""
    try:
        width, height = image_size(path, max_pixels)
    except ImageTooLarge as e:
        fixes.add("too_large", str(e))
        return None
    except DatasetError:
        # a corrupt file in a large dataset is skipped (counted), not fatal
        if ann_size is None:
            fixes.add("skipped", str(path))
            return None
        fixes.add("unreadable", str(path))
        width, height = ann_size
    if ann_size is not None and tuple(ann_size) != (width, height):
        fixes.add("resized", where)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int64)
    difficult = np.asarray(difficult, bool)
    keep = clean_boxes(boxes, width, height, where, fixes)
    boxes, classes, difficult = boxes[keep], classes[keep], difficult[keep]
    if labels is None:
        labels = labels_from_boxes(classes, difficult, num_classes)
    return ImageRecord(image_id, Path(path), width, height, boxes, classes, difficult, labels)


def box_free_record(
    image_id: str, path: Path, labels: np.ndarray, where: str, fixes: Fixes, max_pixels: int | None = MAX_PIXELS
) -> ImageRecord | None:
    empty = np.zeros((0, 4), np.float32)
    return make_record(
        image_id,
        path,
        None,
        empty,
        np.zeros(0, np.int64),
        np.zeros(0, bool),
        len(labels),
        where,
        fixes,
        labels,
        max_pixels,
    )


def resolve_classes(found: list[str], classes: list[str], where: str) -> list[str]:
    """The class list of a reader that finds its classes in the data: ``classes`` if given (all found among
    them), else the sorted names found."""
    if not classes:
        return sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(
            f"{where}: classes {', '.join(unknown)} are not in data.classes ({', '.join(classes)}); "
            "set data.classes: [] to take the classes found in the data"
        )
    return list(classes)
