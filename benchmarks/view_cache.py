#!/usr/bin/env python
"""The augmented-view cache built from scratch against built after the cache without views, whose originals
it copies (``voc07_best.yaml`` after ``voc07_dev.yaml``).

On the first --limit devtrain images, with the best recipe's trunk and levels, after an untimed build of the
views cache in a throwaway folder (oneDNN builds its kernels for each image size once), times one after the
other, each in a fresh cache folder: the views cache from an empty folder; then, in another folder, the cache
without views followed by the views cache (which copies the originals). Prints each build and the ratio.

    python benchmarks/view_cache.py --limit 40
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from patchnet.data import open_split
from patchnet.features.build import build_features, cache_spec
from patchnet.features.extract import build_extractor

from common import REPO, Timer, bench_parser, dev_recipe, machine, table


def main() -> None:
    ap = bench_parser(__doc__, recipe=REPO / "recipes" / "voc07_best.yaml", limit=40)
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {}
        for name, cache, views in (
            ("warm-up (untimed)", "warm", (1,)),
            ("views cache, empty folder", "scratch", (1,)),
            ("cache without views, then the views cache", "after", (0, 1)),
        ):
            recipe = dev_recipe(args, f"runtime.cache_dir={Path(tmp) / cache}", f"data.limit={args.limit}")
            dataset = open_split(recipe.data, recipe.data.train_split)
            extractor = build_extractor(recipe)
            spec = cache_spec(recipe, extractor, dataset, progress=False)
            for v in views:
                with Timer() as t:
                    build_features(spec, dataset, extractor, views=v * recipe.aug.views, progress=False)
                seconds[(name, v)] = t.seconds
        scratch = seconds[("views cache, empty folder", 1)]
        rows = [
            (name + (" (originals copied)" if name.startswith("cache without") and v else ""), v, f"{s:.1f}")
            for (name, v), s in seconds.items()
            if not name.startswith("warm-up")
        ]
        print(table(rows, ("build", "views", "seconds")))
        copied = seconds[("cache without views, then the views cache", 1)]
        print(f"views cache after the cache without views: {copied / scratch:.2f}x the build from an empty folder")


if __name__ == "__main__":
    main()
