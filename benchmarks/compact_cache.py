#!/usr/bin/env python
"""Disk cost and accuracy of the feature cache's compressions (cache.compress), devtrain -> devval.

Builds (or finds) the fp16 caches of both splits, then, for each compression, encodes them again
without running the trunk (a PCA projection is fitted on the fp16 devtrain features), reports the
megabytes per image and the reconstruction error on devval, and trains the head through the normal
``train()`` path on the compressed cache: devval mAP of last.pt.

    python benchmarks/compact_cache.py                                  # all 2000 + 500 images
    python benchmarks/compact_cache.py --configs none int8 pca_int8:416
    python benchmarks/compact_cache.py --limit 30 --epochs 1            # a smoke test

A config is ``none``, ``int8``, ``pca:<dim>`` or ``pca_int8:<dim>``. The caches go to the recipe's
runtime.cache_dir (so a warm fp16 cache there is reused) unless --cache-dir says otherwise.
"""

from __future__ import annotations

import numpy as np

from patchnet.data import open_split
from patchnet.features.build import build_features, cache_spec
from patchnet.features.extract import build_extractor
from patchnet.store.codec import FeatureCodec
from patchnet.training.trainer import train

from common import REPO, Timer, bench_parser, dev_recipe, machine, table

CONFIGS = ["none", "int8", "pca:256", "pca_int8:256", "pca_int8:416"]  # 416: 0.24 MB per VOC image


def stored_mb_per_image(store) -> tuple[float, float]:
    """Megabytes (10^6 bytes) per item: of the feature rows, and of the whole cache folder."""
    files = [f for f in store.path.iterdir() if f.is_file()]
    rows = sum(f.stat().st_size for f in files if f.name.startswith(("features.", "scales.")))
    return rows / len(store) / 1e6, sum(f.stat().st_size for f in files) / len(store) / 1e6


def reconstruction(codec: FeatureCodec, reference, store, items: int = 100) -> tuple[float, float]:
    """Relative L2 error of the rows of the first ``items`` items, mapped back to the trunk's space, against
    the fp16 rows; and the share of their variance (about the projection's mean) that the rows keep."""
    stop = int(store.offsets[min(items, len(store))])
    x = reference.rows[:stop]
    back = store.rows[:stop]
    if codec.components is not None:
        back = back @ codec.components + codec.mean
    centre = codec.mean if codec.components is not None else x.mean(0)
    err = np.linalg.norm(x - back) / np.linalg.norm(x)
    return float(err), float(1 - np.linalg.norm(x - back) ** 2 / np.linalg.norm(x - centre) ** 2)


def parse_config(text: str) -> tuple[str, list[str]]:
    compress, _, dim = text.partition(":")
    if compress not in ("none", "int8", "pca", "pca_int8") or (compress.startswith("pca") != bool(dim)):
        raise SystemExit(f"config {text!r}: use none, int8, pca:<dim> or pca_int8:<dim>")
    return text.replace(":", ""), [f"cache.compress={compress}"] + ([f"cache.pca_dim={int(dim)}"] if dim else [])


def main() -> None:
    ap = bench_parser(__doc__, limit=0)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--epochs", type=int, default=0, help="training epochs (0: the recipe's)")
    ap.add_argument("--cache-dir", default="", help="feature caches (default: the recipe's runtime.cache_dir)")
    ap.add_argument("--output", default=str(REPO / "checkpoints" / "bench_compact"))
    args = ap.parse_args()
    after = [f"runtime.cache_dir={args.cache_dir}"] if args.cache_dir else []
    after += [f"train.epochs={args.epochs}"] if args.epochs else []
    base = [f"data.limit={args.limit}", f"runtime.output={args.output}"]
    recipe = dev_recipe(args, *base, after=after)
    extractor = build_extractor(recipe)
    train_split, val_split = recipe.data.train_split, recipe.data.val_split
    train_set = open_split(recipe.data, train_split)
    splits = {train_split: train_set, val_split: open_split(recipe.data, val_split, train_set.classes)}
    fp16_spec = cache_spec(recipe, extractor, train_set, codec=FeatureCodec())
    fp16 = {s: build_features(fp16_spec, d, extractor) for s, d in splits.items()}
    rows = []
    for text in args.configs:
        label, overrides = parse_config(text)
        r = dev_recipe(args, *base, after=[*after, f"name=compact_{label}", *overrides])
        spec = cache_spec(r, extractor, train_set)  # fits the PCA projection of pca* on the training split
        codec = spec.codec
        stores = {s: build_features(spec, d, extractor) for s, d in splits.items()}
        mb_rows, mb_all = stored_mb_per_image(stores[train_split])
        err, kept = reconstruction(codec, fp16[val_split], stores[val_split])
        with Timer() as t:
            result = train(r)
        m = result.table
        rows.append(
            (
                text,
                f"{mb_rows:.3f}",
                f"{mb_all:.3f}",
                f"{100 * err:.1f}",
                f"{100 * kept:.1f}",
                f"{100 * m.map07:.1f}",
                f"{100 * m.map:.1f}",
                f"{t.seconds / 60:.1f}",
            )
        )
        print(f"{text}: {mb_rows:.3f} MB/image, devval mAP {100 * m.map07:.1f} (11-pt)", flush=True)
    print(
        f"\nmachine: {machine()}; recipe {args.recipe} {' '.join(args.set)}; {len(splits[train_split])} {train_split} "
        f"-> {len(splits[val_split])} {val_split} images, last.pt\n"
    )
    print(
        table(
            rows,
            (
                "cache.compress",
                "MB/image (rows)",
                "MB/image (all)",
                f"{val_split} rel. error %",
                "variance kept %",
                "mAP 11-pt",
                "mAP envelope",
                "train minutes",
            ),
        )
    )


if __name__ == "__main__":
    main()
