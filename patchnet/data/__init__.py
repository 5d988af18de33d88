"""Dataset readers (Pascal VOC XML, COCO JSON, image folders, CSV lists) that all produce one ``ImageRecord`` type.

Images are opened through ``images.open_image`` only: the pixel limit (``data.max_pixels``) is read
from the header before anything is decoded, and every failure names the file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .coco import coco_paths, read_coco
from .detect import Layout, detect_layout
from .images import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    PILLOW_LIMIT,
    DatasetError,
    ImageTooLarge,
    image_files,
    image_size,
    is_hidden,
    load_image,
    open_image,
    thumbnail,
)
from .lists import read_csv_list, read_folder
from .loader import ItemImages, iter_images
from .records import Dataset, Fixes, ImageRecord
from .voc import read_voc, voc_splits

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "PILLOW_LIMIT",
    "Dataset",
    "DatasetError",
    "Fixes",
    "ImageRecord",
    "ImageTooLarge",
    "ItemImages",
    "Layout",
    "coco_paths",
    "data_override",
    "detect_layout",
    "held_out_share",
    "image_files",
    "image_label_statistics",
    "image_size",
    "is_hidden",
    "iter_images",
    "load_image",
    "open_image",
    "open_split",
    "read_coco",
    "read_csv_list",
    "read_folder",
    "read_voc",
    "thumbnail",
    "voc_splits",
    "without_boxes",
]


def image_label_statistics(dataset: Dataset) -> str:
    """A table of images per class (present, difficult-only) and of labels per image, for ``patchnet inspect``."""
    labels = dataset.labels()
    per_image = (labels == 1).sum(1)
    width = max(len(c) for c in [*dataset.classes, "class"])
    lines = [
        f"{dataset.name}: {len(dataset)} images, {int((per_image == 0).sum())} with no class, "
        f"{per_image.mean() if len(per_image) else 0:.2f} classes per image "
        f"(max {per_image.max() if len(per_image) else 0}); "
        f"{'single-label' if dataset.single_label else 'multi-label'}, "
        f"{'with' if dataset.has_boxes else 'without'} boxes",
        f"{'class':<{width}}  {'images':>7}  {'difficult-only':>14}",
    ]
    for c, name in enumerate(dataset.classes):
        lines.append(f"{name:<{width}}  {int((labels[:, c] == 1).sum()):>7}  {int((labels[:, c] == 0).sum()):>14}")
    return "\n".join(lines)


def without_boxes(dataset: Dataset) -> Dataset:
    """The same images and image-level labels, with every box dropped (``data.boxes: false``)."""
    empty = np.zeros((0, 4), np.float32)
    records = [
        replace(r, boxes=empty, box_classes=np.zeros(0, np.int64), box_difficult=np.zeros(0, bool))
        for r in dataset.records
    ]
    return Dataset(dataset.name, dataset.classes, records, dataset.fixes)


def data_override(cfg, root: str | Path | None = None, fmt: str | None = None):
    """A copy of a recipe's data section with another root and/or format (the CLI's --data/--format)."""
    if root is None and fmt is None:
        return cfg
    return replace(cfg, root=str(root) if root is not None else cfg.root, format=fmt or cfg.format)


def open_split(cfg, split: str, classes: list[str] | None = None) -> Dataset:
    """The split ``split`` of the recipe's data section (generating the demo set when needed).

    ``classes``: the class list where ``data.classes`` is empty (the classes found in the data): the
    other splits of a run take the training split's, a checkpoint's splits its own, so that a category
    missing from one split does not shift the others. With ``data.val_from_train``, the training split and
    the val split are the two parts of the training split as read.
    """
    share = getattr(cfg, "val_from_train", 0.0)
    if share and split in (cfg.train_split, cfg.val_split):
        dataset = _read_split(cfg, cfg.train_split, classes)
        val = held_out_share(dataset, share)
        keep = val if split == cfg.val_split else ~val
        name = f"{dataset.name} ({'the' if split == cfg.val_split else 'all but the'} {share:.0%} held out as {split})"
        return Dataset(name, dataset.classes, [r for r, k in zip(dataset.records, keep) if k], dataset.fixes)
    return _read_split(cfg, split, classes)


def held_out_share(dataset: Dataset, share: float) -> np.ndarray:
    """(N,) bool: ``share`` of each class's images (by their first class; images of none form a group), those
    whose ids hash lowest: the same images on every run and machine, whatever order the files were listed in."""
    import hashlib

    labels = dataset.labels()
    first = np.where((labels == 1).any(1), (labels == 1).argmax(1), -1)
    rank = np.array([hashlib.sha1(r.image_id.encode("utf-8", "surrogatepass")).digest() for r in dataset.records])
    out = np.zeros(len(dataset), bool)
    for group in np.unique(first):
        members = np.flatnonzero(first == group)
        n = int(round(share * len(members)))
        if len(members) > 1:  # every class of two images or more is seen in both parts
            n = min(max(n, 1), len(members) - 1)
        out[members[np.argsort(rank[members], kind="stable")[:n]]] = True
    return out


def _read_split(cfg, split: str, classes: list[str] | None = None) -> Dataset:
    """A split as it lies on disk (see ``open_split``)."""
    classes = list(cfg.classes or classes or [])
    limit = cfg.max_pixels
    if cfg.format == "demo":
        from .demo import DEMO_CLASSES, make_demo

        dataset = read_voc(make_demo(cfg.root or "data/demo"), split, DEMO_CLASSES, limit)
    elif cfg.format == "coco" and cfg.annotations:
        dataset = read_coco(*coco_paths(cfg.root, split, cfg.annotations, cfg.images), classes or None, limit)
    elif not cfg.root:
        raise DatasetError(
            "data.root is empty; set it to a VOC root (VOCdevkit/VOC2007) or a COCO folder, "
            "e.g. --set data.root=/path/to/VOCdevkit/VOC2007"
        )
    elif cfg.format == "voc":
        dataset = read_voc(cfg.root, split, classes, limit)
    elif cfg.format == "coco":
        dataset = read_coco(*coco_paths(cfg.root, split, "", cfg.images), classes or None, limit)
    elif cfg.format == "folder":
        dataset = read_folder(cfg.root, split, classes, limit)
    elif cfg.format == "csv":
        dataset = read_csv_list(Path(cfg.root) / f"{split}.csv", classes, limit)
    else:
        raise DatasetError(f"data.format must be voc, coco, demo, folder or csv; got {cfg.format!r}")
    if not getattr(cfg, "boxes", True):
        dataset = without_boxes(dataset)
    if cfg.limit and cfg.limit < len(dataset):
        dataset = Dataset(
            f"{dataset.name} (first {cfg.limit})", dataset.classes, dataset.records[: cfg.limit], dataset.fixes
        )
    return dataset
