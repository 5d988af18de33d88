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

With ``--precisions`` and ``--layouts``, the bound and the extractor run once per trunk precision and
memory layout (channels_last ``cl`` or ``nchw``), side by side in the same rounds; the last column is each
row's speed against the extractor of the first configuration, and a second table has each configuration's
patch features against the first's. An int8 trunk is calibrated first, untimed, on ``backbone.int8_images``
devtrain images.

    python benchmarks/shared_throughput.py --images 80
    python benchmarks/shared_throughput.py --images 80 --set runtime.workers=0
    python benchmarks/shared_throughput.py --images 40 --precisions fp32 bf16 --layouts cl nchw
    python benchmarks/shared_throughput.py --images 40 --precisions fp32 bf16 int8
"""

from __future__ import annotations

import tempfile

import torch

from patchnet.data import Dataset, load_image, read_voc
from patchnet.features.build import build_features, cache_spec, calibrate_extractor
from patchnet.features.extract import build_extractor
from patchnet.recipe import VOC_CLASSES

from common import (
    Timer,
    bench_parser,
    dev_recipe,
    force_int8_weight_bits,
    int8_weight_bits_option,
    machine,
    require_voc,
    table,
)


def level_inputs(ex, image) -> list[tuple[torch.Tensor, list]]:
    """Each trunk input of an image (rescaled, channels_last as the extractor runs it) with its grids."""
    img = ex.prepare(image)
    plan = ex.plan(img.shape[-1], img.shape[-2])
    return [(x, [plan.grids[i] for i in lv.grids]) for lv, x in ex.level_images(img, plan)]


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--round", type=int, default=10, help="images per round of the paths")
    ap.add_argument(
        "--precisions", nargs="*", default=[], help="trunk precisions to compare (fp32 bf16; default: the recipe's)"
    )
    ap.add_argument(
        "--layouts",
        nargs="*",
        default=[],
        choices=["cl", "nchw"],
        help="memory layouts (default: the recipe's)",
    )
    int8_weight_bits_option(ap)
    args = ap.parse_args()
    force_int8_weight_bits(args.int8_weight_bits)
    voc = require_voc(args.voc)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = dev_recipe(args, f"runtime.cache_dir={tmp}")
        if recipe.patches.mode != "shared":
            raise SystemExit(f"this benchmark measures shared mode; the recipe has patches.mode={recipe.patches.mode}")
        precisions = args.precisions or [recipe.backbone.precision]
        layouts = args.layouts or ["cl" if recipe.backbone.channels_last else "nchw"]
        configs = [(p, lay) for p in precisions for lay in layouts]
        full = read_voc(voc, "devval", VOC_CLASSES)
        ds = Dataset(f"{full.name}[:{args.images}]", full.classes, full.records[: args.images])
        images = [load_image(r.path) for r in ds.records]
        extractors = {
            (p, lay): build_extractor(
                dev_recipe(
                    args,
                    f"runtime.cache_dir={tmp}",
                    after=(f"backbone.precision={p}", f"backbone.channels_last={str(lay == 'cl').lower()}"),
                )
            )
            for p, lay in configs
        }
        train = read_voc(voc, "devtrain", VOC_CLASSES)
        for e in extractors.values():  # int8: calibrated on devtrain images, untimed
            if e.int8:
                calibrate_extractor(recipe, e, train, progress=False)
        ready = {c: [level_inputs(ex, im) for im in images] for c, ex in extractors.items()}
        first = configs[0]
        ex = extractors[first]
        pixels = sum(x.shape[-1] * x.shape[-2] for levels in ready[first] for x, _ in levels)

        def bound(c):
            def run(part):
                e = extractors[c]
                with torch.inference_mode(), e.autocast():
                    for levels in ready[c][part]:
                        for x, _ in levels:
                            e.backbone.feature_map(x)

            return run

        def pool(part):
            with torch.inference_mode():
                for im, levels in zip(images[part], ready[first][part]):
                    for x, grids in levels:
                        ex._shared_level(x, grids, im.shape[1], im.shape[0])

        def extractor(c):
            def run(part):
                for im in images[part]:
                    extractors[c](im)

            return run

        spec = cache_spec(recipe, ex, progress=False)  # cache.compress=pca* fits its projection here, untimed

        def build(part):
            build_features(spec, Dataset(f"{ds.name}:{part.start}", ds.classes, ds.records[part]), ex, progress=False)

        with Timer() as t_first:  # untimed in the rows: oneDNN builds its kernels for each new shape
            for c in configs:
                bound(c)(slice(None))
        names = {
            "bound": "bare trunk on the rescaled images (bound)",
            "pool": "trunk + pooling of every patch",
            "extractor": "extractor on decoded images (+ rescaling)",
            "build": "cache build from JPEG files",
        }
        # (configuration, path, run); pooling and the cache build only for the first configuration
        rows = [(c, "bound", bound(c)) for c in configs] + [(c, "extractor", extractor(c)) for c in configs]
        rows += [(first, "pool", pool), (first, "build", build)]
        rows.sort(key=lambda row: (configs.index(row[0]), list(names).index(row[1])))
        seconds = [0.0] * len(rows)
        for r, start in enumerate(range(0, len(images), args.round)):
            part = slice(start, start + args.round)
            shift = r % len(rows)
            for i in list(range(shift, len(rows))) + list(range(shift)):  # each path takes each place in turn
                with Timer() as t:
                    rows[i][2](part)
                seconds[i] += t.seconds
        # each configuration's patch features against the first's (int8 rescales its levels to multiples of 32)
        error = {}
        for c, e in extractors.items():
            rel, cos = [], []
            for im in images[: args.round]:
                a, b = extractors[first](im), e(im)
                rel.append(((b - a).norm() / a.norm()).item())
                cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1).median().item())
            error[c] = (sum(rel) / len(rel), sum(cos) / len(cos))
    n = len(images)
    took = {(c, path): t for (c, path, _), t in zip(rows, seconds)}
    print(f"\nmachine: {machine()}; {args.recipe} {' '.join(args.set)}")
    print(
        f"{n} devval images, {pixels / n / 1e6:.2f} M trunk pixels per image, levels {recipe.patches.levels}, "
        f"workers {recipe.runtime.workers}; the trunk per configuration: "
        + ", ".join(f"{p} {lay} -> {'-'.join(extractors[(p, lay)].precision_id.split('-')[:2])}" for p, lay in configs)
    )
    sizes = len({im.shape for im in images})
    print(
        f"first pass of the bare trunk (oneDNN builds its kernels for each of {sizes} image sizes; untimed in "
        f"the rows): {1000 * t_first.seconds / n / len(configs):.0f} ms/image\n"
    )
    print(
        table(
            [
                (
                    names[path] + (f", {c[0]} {c[1]}" if len(configs) > 1 else ""),
                    f"{n / t:.2f}",
                    f"{1000 * t / n:.0f}",
                    f"{took[(c, 'bound')] / t:.2f}",
                    f"{took[(first, 'extractor')] / t:.2f}",
                )
                for (c, path), t in took.items()
            ],
            ("path", "images/s", "ms/image", "of bound", f"x extractor {first[0]} {first[1]}"),
        )
    )
    if len(configs) > 1:
        print(f"\npatch features of {min(args.round, n)} images against {first[0]} {first[1]}:")
        print(
            table(
                [(f"{c[0]} {c[1]}", f"{100 * r:.1f}%", f"{m:.3f}") for c, (r, m) in error.items() if c != first],
                ("configuration", "relative L2 error", "median cosine per image"),
            )
        )


if __name__ == "__main__":
    main()
