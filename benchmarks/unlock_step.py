#!/usr/bin/env python
"""One training step of the unlocked stages (`train.unlock`), with torch's depthwise weight gradient and with
patchnet's (`patchnet/backbones/lite.py`, `_DepthwiseConv`: a grouped convolution), side by side.

The step is what an epoch of an unlocked run repeats: the stages forward on the boundary maps of
`train.image_batch` images at every shared-mode level (computed once here, as the cache holds them), the
region means of their patches, and the backward pass to the stages' weights, under the recipe's
`train.precision` autocast. The maps are the first --images devval images'; every cell is the median of
--rounds steps after one untimed step, both gradients in each round in turn.

    python benchmarks/unlock_step.py                       # N = 1, 2, 3 on the dev recipe
    python benchmarks/unlock_step.py --unlock 3 --rounds 3
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import patchnet  # noqa: F401  (threads before torch's first use)
from patchnet.backbones import backbone_spec, build_backbone, lite, unlock_split
from patchnet.data import load_image, read_voc
from patchnet.features.extract import build_extractor
from patchnet.recipe import VOC_CLASSES
from patchnet.training.trainer import autocast_dtype
from patchnet.training.unlock import UnlockedStages, boundary_maps

from common import bench_parser, dev_recipe, machine, require_voc, table


def torch_depthwise(x, weight, bias, stride, padding):
    """torch's own depthwise convolution and gradients (what ``lite.depthwise_conv2d`` replaces)."""
    return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])


def step_seconds(stages: UnlockedStages, items, dtype) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        features = stages(items)
    features.float().square().mean().backward()
    stages.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--unlock", type=int, nargs="+", default=[1, 2, 3], help="values of train.unlock, one row each")
    ap.add_argument("--images", type=int, default=8, help="devval images in the step (the recipe's image_batch)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    recipe = dev_recipe(args)
    records = read_voc(require_voc(args.voc), "devval", VOC_CLASSES).records[: args.images]
    images = [load_image(r.path) for r in records]
    dtype = autocast_dtype(recipe.train.precision, torch.device("cpu"))
    fast = lite.depthwise_conv2d
    rows = []
    for n in args.unlock:
        backbone = build_backbone(recipe.backbone.name, recipe.backbone.weights)
        unlock = unlock_split(backbone_spec(recipe.backbone.name), n)
        extractor = build_extractor(recipe, backbone)
        items = [boundary_maps(extractor, image, unlock.part) for image in images]
        stages = UnlockedStages(backbone, unlock).to(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {"torch": [], "patchnet": []}
        try:
            for r in range(args.rounds + 1):
                for name, conv in (("torch", torch_depthwise), ("patchnet", fast)):
                    lite.depthwise_conv2d = conv
                    seconds = step_seconds(stages, items, dtype)
                    if r:  # the first round builds oneDNN's kernels
                        times[name].append(seconds)
        finally:
            lite.depthwise_conv2d = fast
        t, p = (statistics.median(times[k]) for k in ("torch", "patchnet"))
        cells = sum(m.shape[0] * m.shape[1] for item in items for m in item.maps) / len(items)
        rows.append((n, unlock.boundary.name, f"{cells:.0f}", f"{t:.2f}", f"{p:.2f}", f"{t / p:.2f}"))
        print(f"unlock {n}: torch {t:.2f} s, patchnet {p:.2f} s", flush=True)
    print(f"\npython benchmarks/unlock_step.py {' '.join(sys.argv[1:])}")
    print(f"{machine()}; {recipe.backbone.name}, levels {recipe.patches.levels}, {recipe.train.precision}")
    print(f"{args.images} devval images a step, median of {args.rounds} rounds\n")
    head = ("unlock", "maps below", "map cells / image", "torch's gradient s/step", "patchnet's s/step", "ratio")
    print(table(rows, head))


if __name__ == "__main__":
    main()
