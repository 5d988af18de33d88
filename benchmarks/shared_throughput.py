#!/usr/bin/env python
"""Shared-mode extraction against its bound: the bare trunk on the same rescaled images.

Rows, all on the same devval images and measured side by side in one run:
- bound: the trunk alone on every level of every image, rescaled beforehand (ready tensors);
- + pooling: the same, plus each patch's region pooled from the maps (no decoding, no rescaling);
- extractor: ``PatchExtractor`` on decoded images (rescaling included);
- cache build: ``build_features`` from JPEG files to a finished cache (decoding in the loader's
  workers, chunk writing and joining included): what a training run pays.

A first untimed pass of the bare trunk lets oneDNN build its kernels for each input shape (its time
is printed: a real split pays it once per image size). The machine's speed drifts by 10-20% over a
minute, so the rows take turns: every round of ``--round`` images runs all four paths, in an order
that rotates from round to round, and each row sums its rounds.

    python benchmarks/shared_throughput.py --images 80
    python benchmarks/shared_throughput.py --images 80 --set runtime.workers=0
"""

from __future__ import annotations

import tempfile

import torch

from patchnet.datasets import Dataset, load_image, read_voc
from patchnet.extract import build_extractor
from patchnet.features import build_features, cache_spec
from patchnet.recipe import VOC_CLASSES

from common import Timer, bench_parser, dev_recipe, machine, require_voc, table


def level_inputs(ex, image) -> list[tuple[torch.Tensor, list]]:
    """Each trunk input of an image (rescaled, channels_last as the extractor runs it) with its grids."""
    img = ex.prepare(image)
    h, w = img.shape[-2:]
    plan = ex.plan(w, h)
    return [(ex.rescale(img, lv.factor), [plan.grids[i] for i in lv.grids]) for lv in plan.levels]


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--round", type=int, default=10, help="images per round of the four paths")
    args = ap.parse_args()
    voc = require_voc(args.voc)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = dev_recipe(args, f"runtime.cache_dir={tmp}")
        if recipe.patches.mode != "shared":
            raise SystemExit(f"this benchmark measures shared mode; the recipe has patches.mode={recipe.patches.mode}")
        full = read_voc(voc, "devval", VOC_CLASSES)
        ds = Dataset(f"{full.name}[:{args.images}]", full.classes, full.records[: args.images])
        ex = build_extractor(recipe)
        images = [load_image(r.path) for r in ds.records]
        ready = [level_inputs(ex, im) for im in images]
        pixels = sum(x.shape[-1] * x.shape[-2] for levels in ready for x, _ in levels)

        def bound(part):
            with torch.inference_mode(), ex.autocast():
                for levels in ready[part]:
                    for x, _ in levels:
                        ex.backbone.feature_map(x)

        def pool(part):
            with torch.inference_mode():
                for im, levels in zip(images[part], ready[part]):
                    for x, grids in levels:
                        ex._shared_level(x, grids, im.shape[1], im.shape[0])

        def extractor(part):
            for im in images[part]:
                ex(im)

        spec = cache_spec(recipe, ex, progress=False)  # cache.compress=pca* fits its projection here, untimed

        def build(part):
            build_features(spec, Dataset(f"{ds.name}:{part.start}", ds.classes, ds.records[part]), ex, progress=False)

        with Timer() as t_first:  # untimed in the rows: oneDNN builds its kernels for each new shape
            bound(slice(None))
        paths = [bound, pool, extractor, build]
        seconds = dict.fromkeys(paths, 0.0)
        for r, start in enumerate(range(0, len(images), args.round)):
            part = slice(start, start + args.round)
            for path in paths[r % 4 :] + paths[: r % 4]:  # each path takes each place in the order in turn
                with Timer() as t:
                    path(part)
                seconds[path] += t.seconds
    n = len(images)
    names = {
        bound: "bare trunk on the rescaled images (bound)",
        pool: "trunk + pooling of every patch",
        extractor: "extractor on decoded images (+ rescaling)",
        build: "cache build from JPEG files",
    }
    print(f"\nmachine: {machine()}; {args.recipe} {' '.join(args.set)}")
    print(
        f"{n} devval images, {pixels / n / 1e6:.2f} M trunk pixels per image, levels {recipe.patches.levels}, "
        f"autocast {ex.autocast_dtype}, workers {recipe.runtime.workers}"
    )
    sizes = len({im.shape for im in images})
    print(
        f"first pass of the bare trunk (oneDNN builds its kernels for each of {sizes} image sizes; untimed in "
        f"the rows): {1000 * t_first.seconds / n:.0f} ms/image\n"
    )
    print(
        table(
            [
                (names[p], f"{n / t:.2f}", f"{1000 * t / n:.0f}", f"{seconds[bound] / t:.2f}")
                for p, t in seconds.items()
            ],
            ("path", "images/s", "ms/image", "of bound"),
        )
    )


if __name__ == "__main__":
    main()
