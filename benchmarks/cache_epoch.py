#!/usr/bin/env python
"""An epoch on cached features against an epoch that recomputes the trunk.

The recomputing epoch is what training without the cache costs: the trunk over every training
image, then the same head epoch. Both are timed here, on the first --limit devtrain images.

    python benchmarks/cache_epoch.py --limit 100
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import DEV_RECIPE, Timer, machine, require_voc, table, VOC
from patchnet.cache import build_features
from patchnet.datasets import open_split
from patchnet.model import load_checkpoint
from patchnet.recipe import load_recipe
from patchnet.train import build_extractor, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", default=str(VOC))
    ap.add_argument("--recipe", default=str(DEV_RECIPE))
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    voc = require_voc(Path(args.voc))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [f"data.root={voc}", f"data.limit={args.limit}", f"cache.dir={tmp}/cache",
                                           f"output={tmp}/runs", "train.epochs=1", "data.val_split="])
        dataset = open_split(recipe.data, recipe.data.train_split)
        extractor = build_extractor(recipe)
        with Timer() as t_trunk:
            store = build_features(recipe, dataset, extractor)
        result = train(recipe)
        epoch = load_checkpoint(result.run_dir / "last.pt")["history"][0]["seconds"]
    recompute = t_trunk.seconds + epoch
    print(f"\nmachine: {machine()}; {len(dataset)} devtrain images, {store.num_patches} patches, "
          f"{recipe.patches.mode} mode\n")
    print(table([("cached features: the head only", f"{epoch:.2f}", "1"),
                 ("recomputing: trunk over all images + the head", f"{recompute:.1f}", f"{recompute / epoch:.0f}")],
                ("epoch", "seconds", "x cached")))
    print(f"\na cached epoch is {recompute / epoch:.0f}x faster than one that recomputes the trunk")


if __name__ == "__main__":
    main()
