#!/usr/bin/env python
"""Shared-convolution mode against exact mode: images/s, and devval mAP of heads trained on devtrain.

Modes compared (the recipe's backbone, precision and patch grid; only the feature path differs):
- exact: every patch through the whole network (the paper);
- shared: one trunk pass per scale, each patch pooled from the map of its own scale;
- shared, fewer levels: trunk passes only at --levels; each scale pooled from the nearest level;
- hybrid: the fewer-levels mode, with the coarse scales (up to --exact-up-to) cropped as in exact mode.

    python benchmarks/shared_vs_exact.py --speed-images 4 --limit 150
    python benchmarks/shared_vs_exact.py --speed-only
"""

from __future__ import annotations

from patchnet.data import load_image, open_split
from patchnet.features.extract import build_extractor
from patchnet.training.trainer import train

from common import REPO, Timer, bench_parser, dev_recipe, machine, require_voc, table


def main() -> None:
    ap = bench_parser(__doc__, limit=300, limit_help="first N images of devtrain and of devval for mAP")
    ap.add_argument("--levels", default="1,2,4", help="pyramid levels of the fewer-levels mode")
    ap.add_argument("--speed-images", type=int, default=4, help="devval images timed per mode")
    ap.add_argument("--exact-up-to", type=float, default=2.0, help="hybrid mode: scales cropped as in exact mode")
    ap.add_argument("--modes", default="exact,shared,shared_levels,hybrid")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--output", default=str(REPO / "checkpoints" / "bench_shared_vs_exact"))
    args = ap.parse_args()
    require_voc(args.voc)
    modes = {
        "exact": ["patches.mode=exact"],
        "shared": ["patches.mode=shared", "patches.levels=[]"],
        "shared_levels": ["patches.mode=shared", f"patches.levels=[{args.levels}]"],
        "hybrid": ["patches.mode=shared", f"patches.levels=[{args.levels}]", f"patches.exact_up_to={args.exact_up_to}"],
    }
    names = {
        "exact": "exact",
        "shared": "shared, every scale",
        "shared_levels": f"shared, levels {args.levels}",
        "hybrid": f"hybrid: exact up to {args.exact_up_to:g}, then levels {args.levels}",
    }
    rows, speed = [], {}
    for mode in args.modes.split(","):  # each mode's settings come after --set: they are what is compared
        recipe = dev_recipe(args, f"runtime.output={args.output}", after=[*modes[mode], f"name={mode}"])
        extractor = build_extractor(recipe)
        images = [
            load_image(r.path) for r in open_split(recipe.data, recipe.data.val_split).records[: args.speed_images]
        ]
        extractor(images[0][:160, :160])  # warm-up
        with Timer() as t:
            for im in images:
                extractor(im)
        speed[mode] = len(images) / t.seconds
        ap07 = env = float("nan")
        if not args.speed_only:
            recipe = dev_recipe(
                args, f"runtime.output={args.output}", after=[*modes[mode], f"name={mode}", f"data.limit={args.limit}"]
            )
            result = train(recipe)
            ap07, env = result.table.map07, result.table.map
        rows.append((mode, speed[mode], ap07, env))
    exact = speed.get("exact")
    print(f"\nmachine: {machine()}; recipe {args.recipe}")
    print(
        f"speed on {args.speed_images} devval images; mAP: heads trained on the first {args.limit} devtrain "
        f"images, scored on the first {args.limit} devval images\n"
    )
    print(
        table(
            [
                (
                    names[m],
                    f"{s:.2f}",
                    f"{s / exact:.1f}x" if exact else "-",
                    "-" if a != a else f"{100 * a:.1f}",
                    "-" if e != e else f"{100 * e:.1f}",
                )
                for m, s, a, e in rows
            ],
            ("mode", "images/s", "vs exact", "mAP 11-pt", "mAP envelope"),
        )
    )


if __name__ == "__main__":
    main()
