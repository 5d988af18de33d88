#!/usr/bin/env python
"""Photos of many sizes against one size: extraction time per pixel, warm-up included, with the rescaled sides
rounded to a multiple (the int8 path's size buckets) or not.

oneDNN builds its kernels for every input shape it meets, so a folder of photos of many sizes pays that again
and again where VOC's few sizes pay it once. Each cell is a fresh process that extracts --images devval
images with the dev recipe's extractor, timed from the first image (warm-up included), each image resized
beforehand to
- ``one``: 500 x 375 (or 375 x 500 for a portrait image), VOC's commonest size;
- ``many``: a size of its own, sides from 320 to 640 pixels at the image's aspect ratio.
``--multiple 1 32``: 1 is the float trunks' way (sides rounded to the pixel), 32 the int8 path's buckets
(``PatchExtractor.multiple``). Rounds alternate the cells; a cell's figure is the sum of its rounds.

    python benchmarks/shapes.py --images 30 --rounds 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import patchnet  # noqa: F401  # before torch: the thread count and wait policy

HERE = Path(__file__).resolve()


def resized(images: list, kind: str) -> list:
    """The decoded images ((H, W, 3) uint8 arrays) as (3, H, W) uint8 tensors at one size or at a size each."""
    import torch
    import torch.nn.functional as F

    out = []
    for i, array in enumerate(images):
        img = torch.from_numpy(array).permute(2, 0, 1)
        h, w = img.shape[-2:]
        if kind == "one":
            size = (375, 500) if w >= h else (500, 375)
        else:  # the long side from 320 to 640, a different one for every image
            side = 320 + round(320 * i / max(1, len(images) - 1))
            size = (round(side * h / w), side) if w >= h else (side, round(side * w / h))
        x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(x[0].round().clamp(0, 255).byte())
    return out


def child(args) -> None:
    from patchnet.data import load_image, read_voc
    from patchnet.features.extract import build_extractor
    from patchnet.recipe import VOC_CLASSES

    from common import dev_recipe, require_voc

    recipe = dev_recipe(args)
    records = read_voc(require_voc(args.voc), "devval", VOC_CLASSES).records[: args.images]
    images = resized([load_image(r.path) for r in records], args.kind)
    extractor = build_extractor(recipe)
    extractor.multiple = args.multiple[0]
    start = time.perf_counter()
    for img in images:
        extractor(img)
    seconds = time.perf_counter() - start
    pixels = sum(int(img.shape[-1] * img.shape[-2]) for img in images)
    shapes = len({tuple(i.shape) for i in images})
    print("SHAPES " + json.dumps({"seconds": seconds, "pixels": pixels, "shapes": shapes}))


def main() -> None:
    from common import bench_parser, cpu_name, table

    ap = bench_parser(__doc__)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--multiple", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kind", choices=["one", "many"], help="(internal) the child's images")
    args = ap.parse_args()
    if args.kind:
        return child(args)
    cells = [(k, m) for m in args.multiple for k in ("one", "many")]
    seconds, pixels, shapes = dict.fromkeys(cells, 0.0), dict.fromkeys(cells, 0), {}
    for r in range(args.rounds):
        for kind, multiple in cells[r % len(cells) :] + cells[: r % len(cells)]:
            cmd = [sys.executable, str(HERE), "--kind", kind, "--voc", args.voc, "--recipe", args.recipe]
            cmd += ["--images", str(args.images), "--multiple", str(multiple), "--set", *args.set]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            done = json.loads(out.split("SHAPES ", 1)[1])
            seconds[(kind, multiple)] += done["seconds"]
            pixels[(kind, multiple)] += done["pixels"]
            shapes[(kind, multiple)] = done["shapes"]
            rate = 1e9 * done["seconds"] / done["pixels"]
            print(f"round {r + 1}/{args.rounds}: {kind} x{multiple}: {rate:.1f} ms/Mpixel", file=sys.stderr)
    per = {c: 1e9 * seconds[c] / pixels[c] for c in cells}  # ms per megapixel
    print(f"\npython benchmarks/shapes.py {' '.join(sys.argv[1:])}")
    print(f"{cpu_name()}; {args.recipe} {' '.join(args.set)}; {args.images} devval images, {args.rounds} round(s)\n")
    rows = [
        (
            f"sides rounded to {m}" if m > 1 else "sides rounded to the pixel",
            kind,
            shapes[(kind, m)],
            f"{per[(kind, m)]:.1f}",
            f"{per[(kind, m)] / per[('one', m)]:.2f}",
            f"{per[(kind, m)] / per[(kind, args.multiple[0])]:.2f}",
        )
        for m in args.multiple
        for kind in ("one", "many")
    ]
    head = ("rescaling", "sizes", "input shapes", "ms/Mpixel", "x one size", f"x rounded to {args.multiple[0]}")
    print(table(rows, head))


if __name__ == "__main__":
    main()
