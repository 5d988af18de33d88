#!/usr/bin/env python
"""Shared-mode extraction against its bound: the bare trunk on the same rescaled images.

Rows, all on the same devval images and measured side by side in one run:
- bound: the trunk alone on every level of every image, rescaled beforehand (ready tensors);
- + pooling: the same, plus each patch's region pooled from the maps (no decoding, no rescaling);
- extractor: ``PatchExtractor`` on decoded images (rescaling included);
- cache build: ``build_features`` from JPEG files to a finished cache (decoding in the loader's
  workers, chunk writing and joining included): what a training run pays.

    python benchmarks/shared_throughput.py --images 40
    python benchmarks/shared_throughput.py --images 40 --set runtime.workers=0
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from common import DEV_RECIPE, Timer, machine, require_voc, table, VOC
from patchnet.cache import build_features
from patchnet.datasets import Dataset, load_image, read_voc
from patchnet.extract import build_extractor
from patchnet.recipe import VOC_CLASSES, load_recipe


def level_inputs(ex, image) -> list[tuple[torch.Tensor, list]]:
    """Each trunk input of an image (rescaled, channels_last as the extractor runs it) with its grids."""
    img = ex._prepare(image)
    h, w = img.shape[-2:]
    grids = ex.grids(w, h)
    return [(ex._rescale(img, lv.factor), [grids[i] for i in lv.grids]) for lv in ex.levels(grids, w, h)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", default=str(VOC))
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--recipe", default=str(DEV_RECIPE))
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    voc = require_voc(args.voc)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [f"data.root={voc}", f"runtime.cache_dir={tmp}", *args.set])
        if recipe.patches.mode != "shared":
            raise SystemExit("this benchmark measures shared mode; the recipe has patches.mode="
                             f"{recipe.patches.mode}")
        full = read_voc(voc, "devval", VOC_CLASSES)
        ds = Dataset(f"{full.name}[:{args.images}]", full.classes, full.records[:args.images])
        ex = build_extractor(recipe)
        images = [load_image(r.path) for r in ds.records]
        ex(images[0])  # warm-up: first-call allocations
        ready = [level_inputs(ex, im) for im in images]
        pixels = sum(x.shape[-1] * x.shape[-2] for levels in ready for x, _ in levels)
        with torch.inference_mode(), Timer() as t_bound:
            for levels in ready:
                for x, _ in levels:
                    with ex._autocast():
                        ex.backbone.feature_map(x)
        with torch.inference_mode(), Timer() as t_pool:
            for im, levels in zip(images, ready):
                for x, grids in levels:
                    ex._shared_level(x, grids, im.shape[1], im.shape[0])
        with Timer() as t_ex:
            for im in images:
                ex(im)
        with Timer() as t_build:
            build_features(recipe, ds, ex, progress=False)
    n = len(images)
    rows = [("bare trunk on the rescaled images (bound)", t_bound), ("trunk + pooling of every patch", t_pool),
            ("extractor on decoded images (+ rescaling)", t_ex), ("cache build from JPEG files", t_build)]
    print(f"\nmachine: {machine()}; {args.recipe} {' '.join(args.set)}")
    print(f"{n} devval images, {pixels / n / 1e6:.2f} M trunk pixels per image, levels {recipe.patches.levels}, "
          f"autocast {ex.autocast_dtype}, workers {recipe.runtime.workers}\n")
    print(table([(name, f"{n / t.seconds:.2f}", f"{1000 * t.seconds / n:.0f}", f"{t_bound.seconds / t.seconds:.2f}")
                 for name, t in rows], ("path", "images/s", "ms/image", "of bound")))


if __name__ == "__main__":
    main()
