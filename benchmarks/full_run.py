#!/usr/bin/env python
"""Wall time of a whole devtrain -> devval run in the default CPU recipe, features included.

Starts from an empty feature cache, times each phase, and extrapolates to a run the size of the
official VOC2007 train -> val split (2500 + 2508 images).

    python benchmarks/full_run.py                      # recipes/voc07_dev.yaml
    python benchmarks/full_run.py --set patches.levels=[]
    python benchmarks/full_run.py --set backbone.precision=int8 train.precision=fp32   # a CPU without native bf16
    python benchmarks/full_run.py --float-multiple 32   # float trunks fed the int8 path's size buckets
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from patchnet.data import open_split
from patchnet.features.build import cache_spec
from patchnet.features.extract import build_extractor
from patchnet.training.splits import prepare_split
from patchnet.training.trainer import train

from common import (
    REPO,
    Timer,
    bench_parser,
    dev_recipe,
    force_int8_weight_bits,
    int8_weight_bits_option,
    machine,
    require_voc,
    table,
)


def bucket_float_sizes(multiple: int) -> None:
    """Every extractor built from now on rounds the sides of its rescaled images to ``multiple``, float or not."""
    from patchnet.features.extract import PatchExtractor

    init = PatchExtractor.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.multiple = multiple

    PatchExtractor.__init__ = __init__


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--output", default=str(REPO / "checkpoints" / "bench_full_run"))
    ap.add_argument("--cache-dir", default="", help="an empty folder to keep the cache in (default: a temporary one)")
    int8_weight_bits_option(ap)
    ap.add_argument(
        "--float-multiple",
        type=int,
        default=0,
        help="round the rescaled sides of float trunks to this multiple, as the int8 path does (32); "
        "needs an empty --cache-dir or the default temporary one: the cache key does not hold it",
    )
    args = ap.parse_args()
    force_int8_weight_bits(args.int8_weight_bits)
    if args.float_multiple:
        bucket_float_sizes(args.float_multiple)
    require_voc(args.voc)
    if args.cache_dir and Path(args.cache_dir).exists() and any(Path(args.cache_dir).iterdir()):
        raise SystemExit(f"--cache-dir {args.cache_dir} is not empty: the run must start from an empty cache")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or f"{tmp}/cache"
        recipe = dev_recipe(args, f"runtime.cache_dir={cache}", f"runtime.output={args.output}")
        with Timer() as total:
            extractor = build_extractor(recipe)
            with Timer() as t_train:  # the splits as train() prepares them, so that it finds their caches warm
                train_set = open_split(recipe.data, recipe.data.train_split)
                spec = cache_spec(recipe, extractor, train_set)  # with cache.compress=pca*, the projection too
                tr = prepare_split(
                    recipe, recipe.data.train_split, extractor, spec, views=recipe.aug.views, dataset=train_set
                )
            with Timer() as t_val:
                va = prepare_split(recipe, recipe.data.val_split, extractor, spec, classes=tr.dataset.classes)
            with Timer() as t_head:
                result = train(recipe)
    n_train, n_val = len(tr.dataset), len(va.dataset)
    per_image = (t_train.seconds + t_val.seconds) / (n_train + n_val)
    official = per_image * (2500 + 2508) + t_head.seconds * 2500 / n_train
    print(f"\nmachine: {machine()}; recipe {args.recipe} {' '.join(args.set)}\n")
    print(
        table(
            [
                (
                    f"features, {n_train} training images",
                    f"{t_train.seconds / 60:.1f}",
                    f"{t_train.seconds / n_train:.2f} s/image",
                ),
                (
                    f"features, {n_val} validation images",
                    f"{t_val.seconds / 60:.1f}",
                    f"{t_val.seconds / n_val:.2f} s/image",
                ),
                (f"head: {result.epochs} epochs + validation", f"{t_head.seconds / 60:.1f}", ""),
                ("whole run", f"{total.seconds / 60:.1f}", ""),
            ],
            ("phase", "minutes", ""),
        )
    )
    print(f"\nheld-out devtrain (selection) mAP {100 * result.best_map07:.2f} (11-point)")
    print(f"devval mAP {100 * result.table.map07:.2f} (11-point), {100 * result.table.map:.2f} (envelope)")
    print(f"extrapolated to VOC2007 train -> val (2500 + 2508 images): {official / 60:.0f} minutes")
    print(result.table.format())


if __name__ == "__main__":
    main()
