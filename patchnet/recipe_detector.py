"""The recipe's ``detector`` section: the detection head of ``train.detector: mil`` (``patchnet.head.mil``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DetectorConfig:
    """The detection head of ``train.detector: mil`` (``patchnet.head.mil``), trained on cached trunk maps after
    the classification head, whose FCa it reads through."""

    # candidate regions (patchnet.patches.regions): 5 ratios, step 1/2, scales to 6: about 3000 per VOC
    # image, 82% of devtrain's boxes at IoU >= 0.5 (benchmarks/region_recall.py)
    scales: list[float] = field(default_factory=lambda: [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 5.0, 6.0])
    step: float = 0.5
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 2.0, 1 / 3, 3.0])  # width : height
    refinements: int = 3  # OICR's refinement classifiers
    context: float = 0.0  # > 0: the detection stream scores a region against its frame, the box grown this much
    # the first refinement's top region of each class present: WSDDN's (OICR), or the region nearest the
    # classification head's score-map box (infer.box_threshold, infer.map_prior)
    seed: Literal["wsddn", "map"] = "wsddn"
    iou: float = 0.5  # a region overlapping a top region this much takes its class (pseudo-labels)
    epochs: int = 4  # the loss still falls a little after 4; 4 measured (docs/views.md)
    lr: float = 0.01
    image_batch: int = 4  # images per step
    nms: float = 0.3  # class-wise NMS of the detections
    max_boxes: int = 100  # per class and image, after NMS


def detector_problem(d: DetectorConfig, compress: str, unlock: int) -> str | None:
    """What makes ``train.detector: mil`` impossible with this section and cache, in one line; None where nothing."""
    if compress.startswith("pca"):
        return (
            f"train.detector=mil reads the trunk's maps through the head's first layer, which "
            f"cache.compress={compress} fits to projected features; set cache.compress: none or int8"
        )
    if unlock:
        return "train.detector=mil reads the frozen trunk's maps; set train.unlock: 0"
    if not d.scales or min(d.scales) < 1 or not d.ratios or min(d.ratios) <= 0 or not 0 < d.step <= 0.5:
        return (
            f"detector: scales must be >= 1, ratios positive and step in (0, 0.5]; got scales={d.scales}, "
            f"ratios={d.ratios}, step={d.step}"
        )
    if d.epochs < 1 or d.image_batch < 1 or d.lr <= 0 or d.refinements < 0 or d.max_boxes < 1:
        return (
            f"detector: epochs, image_batch and max_boxes must be at least 1, lr positive, refinements at least "
            f"0; got epochs={d.epochs}, image_batch={d.image_batch}, max_boxes={d.max_boxes}, lr={d.lr}, "
            f"refinements={d.refinements}"
        )
    if not 0 < d.iou < 1 or not 0 < d.nms <= 1:
        return f"detector.iou must lie in (0, 1) and detector.nms in (0, 1]; got {d.iou} and {d.nms}"
    return None
