#!/usr/bin/env python
"""An epoch on cached features against an epoch that recomputes the trunk, and the three supervisions' epochs.

The recomputing epoch is what training without the cache costs: the trunk over every training
image, then the same head epoch. Both are timed here, on the first --limit devtrain images, with the
recipe's feature mode; exact mode (the paper's path) is timed on the first --exact-images of them
and scaled to --limit images, since it costs seconds per image.

On the same cache it also times one image-level epoch (train.supervision=images: every patch of
every image through the head) and one `both` epoch, as ratios to the patch-level epoch.

    python benchmarks/cache_epoch.py --limit 100 --exact-images 10
"""

from __future__ import annotations

import tempfile

from patchnet.checkpoint import load_checkpoint
from patchnet.data import load_image, open_split
from patchnet.features.build import build_features, cache_spec
from patchnet.features.extract import build_extractor
from patchnet.training.trainer import train

from common import Timer, bench_parser, dev_recipe, machine, require_voc, table


def main() -> None:
    ap = bench_parser(__doc__, limit=100, limit_help="first N devtrain images")
    ap.add_argument("--exact-images", type=int, default=10, help="images timed in exact mode (0: skip)")
    args = ap.parse_args()
    require_voc(args.voc)
    with tempfile.TemporaryDirectory() as tmp:
        run = [
            f"data.limit={args.limit}",
            f"runtime.cache_dir={tmp}/cache",
            f"runtime.output={tmp}/runs",
            "train.epochs=1",
            "data.val_split=",
        ]
        recipe = dev_recipe(args, *run)
        dataset = open_split(recipe.data, recipe.data.train_split)
        extractor = build_extractor(recipe)
        with Timer() as t_trunk:  # with cache.compress=pca*, its projection too: a run without the cache pays it
            store = build_features(cache_spec(recipe, extractor, dataset), dataset, extractor)
        result = train(recipe)
        epoch = load_checkpoint(result.run_dir / "last.pt").history[0]["seconds"]
        others = {}
        for sup in ("images", "both"):
            r = dev_recipe(args, *run, f"name={sup}", f"train.supervision={sup}", "pool.name=topk")
            others[sup] = load_checkpoint(train(r).run_dir / "last.pt").history[0]["seconds"]
    rows = [
        ("cached features: the head only (patch loss, train.supervision=boxes)", f"{epoch:.2f}", "1"),
        *(
            (f"cached features, train.supervision={k}: every patch of every image", f"{v:.2f}", f"{v / epoch:.1f}")
            for k, v in others.items()
        ),
        (
            f"recomputing, {recipe.patches.mode} mode: trunk over all images + the head",
            f"{t_trunk.seconds + epoch:.1f}",
            f"{(t_trunk.seconds + epoch) / epoch:.0f}",
        ),
    ]
    if args.exact_images:
        exact = build_extractor(dev_recipe(args, "patches.mode=exact"))
        images = [load_image(r.path) for r in dataset.records[: args.exact_images]]
        with Timer() as t_exact:
            for im in images:
                exact(im)
        recompute = t_exact.seconds * len(dataset) / len(images) + epoch
        rows.append(
            (
                f"recomputing, exact mode (timed on {len(images)} images, scaled)",
                f"{recompute:.1f}",
                f"{recompute / epoch:.0f}",
            )
        )
    print(f"\nmachine: {machine()}; {len(dataset)} devtrain images, {store.num_patches} patches\n")
    print(table(rows, ("epoch", "seconds", "x cached")))


if __name__ == "__main__":
    main()
