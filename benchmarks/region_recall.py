#!/usr/bin/env python
"""Recall of the ground-truth boxes by the detection head's candidate regions (``patchnet.patches.regions``)
against their count per image: the share of boxes (not difficult) that some region overlaps at IoU >= 0.5 and
>= 0.7, for sets of scales, steps and aspect ratios. Boxes only: no image is decoded.

    python benchmarks/region_recall.py --split devtrain
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision.ops import box_iou

from patchnet.data import open_split
from patchnet.patches.regions import region_boxes
from patchnet.recipe import load_recipe

SETS = {
    "squares 1/3 (the paper's)": ([1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0], 1 / 3, (1.0,)),
    "3 ratios, step 1/2": ([1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0], 1 / 2, (1.0, 0.5, 2.0)),
    "5 ratios, step 1/2": ([1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0], 1 / 2, (1.0, 0.5, 2.0, 1 / 3, 3.0)),
    "3 ratios, step 1/3": ([1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0], 1 / 3, (1.0, 0.5, 2.0)),
    "5 ratios, step 1/3": ([1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0], 1 / 3, (1.0, 0.5, 2.0, 1 / 3, 3.0)),
    "5 ratios, step 1/3, scales to 6": (
        [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 5.0, 6.0],
        1 / 3,
        (1.0, 0.5, 2.0, 1 / 3, 3.0),
    ),
    "5 ratios, step 1/4, scales to 6": (
        [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 5.0, 6.0],
        1 / 4,
        (1.0, 0.5, 2.0, 1 / 3, 3.0),
    ),
    "5 ratios, step 1/2, scales to 6": (
        [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 5.0, 6.0],
        1 / 2,
        (1.0, 0.5, 2.0, 1 / 3, 3.0),
    ),
    "5 ratios, step 1/2, scales to 8": (
        [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 5.0, 6.0, 8.0],
        1 / 2,
        (1.0, 0.5, 2.0, 1 / 3, 3.0),
    ),
    "5 ratios, step 1/3, scales 1-6 by 1.25": (
        [1.0, 1.25, 1.56, 1.95, 2.44, 3.05, 3.81, 4.77, 5.96],
        1 / 3,
        (1.0, 0.5, 2.0, 1 / 3, 3.0),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/voc07_dev.yaml")
    parser.add_argument("--split", default="devtrain")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    dataset = open_split(recipe.data, args.split)
    print(f"{dataset.name}: {len(dataset.records)} images")
    print(f"{'region set':34s} {'regions/img':>11s} {'recall@0.5':>10s} {'recall@0.7':>10s}")
    for name, (scales, step, ratios) in SETS.items():
        counts, best = [], []
        for rec in dataset.records:
            keep = ~rec.box_difficult
            if not keep.any():
                continue
            boxes = region_boxes(rec.width, rec.height, scales, step, ratios)
            counts.append(len(boxes))
            iou = box_iou(torch.from_numpy(rec.boxes[keep]).double(), torch.from_numpy(boxes).double())
            best.append(iou.max(1).values.numpy())
        best_all = np.concatenate(best)
        print(
            f"{name:34s} {np.mean(counts):11.0f} {100 * (best_all >= 0.5).mean():10.1f} "
            f"{100 * (best_all >= 0.7).mean():10.1f}"
        )


if __name__ == "__main__":
    main()
