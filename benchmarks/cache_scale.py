#!/usr/bin/env python
"""Does building the feature cache scale? Time per image and peak memory for N = 1k, 5k, 20k images.

Generates one set of demo images (textured shapes, patchnet/demo.py) of the largest size,
then builds the cache of its first N images for each N in a fresh process, from an empty cache,
and reports seconds per image, peak resident memory and disk per image. Flat memory and a flat
time per image mean the cache streams: nothing grows with the dataset but the disk.

    python benchmarks/cache_scale.py                       # 1000 5000 20000 (about an hour here)
    python benchmarks/cache_scale.py --sizes 500 2000 8000 --set backbone.input_size=160
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from patchnet.data.demo import make_demo

from common import REPO, bench_parser, machine, table


def _one(root: Path, n: int, cache: Path, overrides: list[str]) -> dict:
    """Build the cache of the first ``n`` images in this process; its time, peak memory and disk."""
    from patchnet.data import read_voc
    from patchnet.data.demo import DEMO_CLASSES
    from patchnet.features.build import build_features, cache_spec
    from patchnet.features.extract import build_extractor
    from patchnet.recipe import load_recipe

    (root / "ImageSets" / "Main" / f"first{n}.txt").write_text("".join(f"{i:06d}\n" for i in range(n)))
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [f"runtime.cache_dir={cache}", *overrides])
    dataset = read_voc(root, f"first{n}", DEMO_CLASSES)
    extractor = build_extractor(recipe)
    start = time.perf_counter()
    store = build_features(cache_spec(recipe, extractor, dataset), dataset, extractor)
    seconds = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "seconds": seconds, "patches": store.num_patches, "peak_mb": peak, "disk_mb": disk / 2**20}


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None)  # the demo recipe's images; --set overrides recipes/demo.yaml
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--root", default="data/scale", help="where the generated images go (kept between runs)")
    ap.add_argument("--cache", default="", help="cache folder (default: <root>/cache, emptied first)")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    root = Path(args.root)
    cache = Path(args.cache or root / "cache")
    if args.one:
        print(json.dumps(_one(root, args.one, cache, args.set)))
        return
    print(f"generating {max(args.sizes)} demo images in {root} (once)", flush=True)
    make_demo(root, splits={"all": max(args.sizes)})
    rows = []
    for n in sorted(args.sizes):
        shutil.rmtree(cache, ignore_errors=True)  # every size starts from an empty cache
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--root", str(root), "--cache", str(cache), "--set", *args.set],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"N={n}: {r['seconds']:.0f} s, peak {r['peak_mb']:.0f} MB", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    base = rows[0]["seconds"] / rows[0]["n"]
    print(f"\nmachine: {machine()}; recipes/demo.yaml {' '.join(args.set)}\n")
    print(
        table(
            [
                (
                    r["n"],
                    f"{r['patches']:,}",
                    f"{r['seconds'] / 60:.1f}",
                    f"{1000 * r['seconds'] / r['n']:.0f}",
                    f"{r['seconds'] / r['n'] / base:.2f}",
                    f"{r['peak_mb']:.0f}",
                    f"{r['disk_mb'] / r['n']:.2f}",
                    f"{r['disk_mb'] / 1024:.2f}",
                )
                for r in rows
            ],
            (
                "images",
                "patches",
                "minutes",
                "ms/image",
                "per image vs smallest",
                "peak RSS MB",
                "MB/image",
                "GB on disk",
            ),
        )
    )


if __name__ == "__main__":
    main()
