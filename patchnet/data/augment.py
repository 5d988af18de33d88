"""Augmented views ("CNNaug"): jittered crops, flips, small rotations and colour changes.

With the feature cache an augmented view is a fixed image: view ``v`` of image ``i`` is drawn from
a seed derived from ``(seed, i, v)``, so it is the same every time it is rebuilt.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from ..recipe import AugConfig


def build_pipeline(cfg: AugConfig) -> A.Compose:
    """The albumentations pipeline of a recipe's ``aug`` section; boxes follow the image."""
    lo = min(max(cfg.crop_scale[0], 0.0), 1.0)
    border = (1.0 - lo) / 2  # crop up to this fraction from each side
    transforms = [
        A.RandomCropFromBorders(crop_left=border, crop_right=border, crop_top=border, crop_bottom=border, p=1.0),
        A.HorizontalFlip(p=cfg.hflip),
        A.Rotate(limit=cfg.rotate, border_mode=cv2.BORDER_REFLECT_101, p=0.5 if cfg.rotate else 0.0),
        A.ColorJitter(
            brightness=cfg.color,
            contrast=cfg.color,
            saturation=cfg.color,
            hue=cfg.color / 4,
            p=0.8 if cfg.color else 0.0,
        ),
    ]
    params = A.BboxParams(format="pascal_voc", label_fields=["classes", "difficult"], min_area=1, clip=True)
    return A.Compose(transforms, bbox_params=params)


def view_seed(seed: int, image_index: int, view: int) -> int:
    return int(np.random.SeedSequence([seed, image_index, view]).generate_state(1)[0])


def augment(
    pipeline: A.Compose, image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, difficult: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One deterministic augmented view: image, boxes (K, 4), classes (K,), difficult (K,)."""
    pipeline.set_random_seed(seed)
    out = pipeline(
        image=image,
        bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        classes=list(classes),
        difficult=list(difficult),
    )
    boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    return (
        np.ascontiguousarray(out["image"]),
        boxes,
        np.asarray(out["classes"], np.int64).reshape(-1),
        np.asarray(out["difficult"], bool).reshape(-1),
    )
