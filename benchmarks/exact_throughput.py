#!/usr/bin/env python
"""Exact mode's patches/s against the bare trunk (the bound) and against a naive PIL crop loop.

- bound: the trunk alone on ready (B, 3, S, S) tensors;
- exact: patchnet's exact mode on decoded images (per-scale rescale, slices, batches);
- PIL crops, same trunk: a PIL crop + resize of every patch into the same trunk, batch, dtype and
  memory format as the two above (isolates the cost of cropping);
- naive: the straightforward implementation: PIL crop + resize per patch, the plain fp32 NCHW
  model (no BN folding, no channels_last, no bf16), the same batch size.

    python benchmarks/exact_throughput.py --images 4
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from patchnet.backbones import build_backbone
from patchnet.data import load_image, read_voc
from patchnet.features.extract import PatchExtractor
from patchnet.recipe import VOC_CLASSES, BackboneConfig, PatchConfig

from common import Timer, bench_parser, machine, require_voc, table


def pil_crops(extractor: PatchExtractor, image: np.ndarray, model=None) -> int:
    """Crop and resize every patch with PIL, then run ``model`` (default: the extractor's own trunk)."""
    pil = Image.fromarray(image)
    boxes = extractor.plan(pil.width, pil.height).boxes
    s, bs = extractor.size, extractor.batch_size
    n = 0
    with torch.inference_mode():
        for start in range(0, len(boxes), bs):
            crops = [np.asarray(pil.crop(tuple(b)).resize((s, s), Image.BILINEAR)) for b in boxes[start : start + bs]]
            x = torch.from_numpy(np.stack(crops)).to(extractor.device).permute(0, 3, 1, 2).float().div_(255)
            if model is not None:
                model(x)
            else:
                x = x.contiguous(memory_format=torch.channels_last) if extractor.channels_last else x
                with extractor.autocast():
                    extractor.backbone(x)
            n += len(crops)
    return n


def bound(extractor: PatchExtractor, patches: int) -> None:
    s, bs = extractor.size, extractor.batch_size
    x = torch.rand(bs, 3, s, s, device=extractor.device)
    x = x.contiguous(memory_format=torch.channels_last) if extractor.channels_last else x
    with torch.inference_mode(), extractor.autocast():
        for _ in range(0, patches, bs):
            extractor.backbone(x)


def main() -> None:
    ap = bench_parser(__doc__, recipe=None, sets=False)  # no recipe: the backbone and batch are options of their own
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    ds = read_voc(require_voc(args.voc), "devval", VOC_CLASSES)
    images = [load_image(r.path) for r in ds.records[: args.images]]
    plain = build_backbone(args.backbone)  # the unoptimised fp32 NCHW model of the naive loop
    ex = PatchExtractor(
        plain, PatchConfig(mode="exact"), BackboneConfig(precision=args.precision), batch_size=args.batch
    )
    plain.to(ex.device)  # the extractor runs a fused copy; the naive loop runs this one, on the same device
    ex(images[0][:200, :200])  # warm-up
    total = sum(len(ex.plan(im.shape[1], im.shape[0]).boxes) for im in images)
    with Timer() as t_bound:
        bound(ex, total)
    with Timer() as t_exact:
        for im in images:
            ex(im)
    with Timer() as t_crops:
        for im in images:
            pil_crops(ex, im)
    with Timer() as t_naive:
        for im in images:
            pil_crops(ex, im, model=plain)
    rates = {
        k: total / t.seconds
        for k, t in (("bound", t_bound), ("exact", t_exact), ("crops", t_crops), ("naive", t_naive))
    }
    print(f"machine: {machine()}; autocast {ex.autocast_dtype}, channels_last {ex.channels_last}, batch {args.batch}")
    print(f"{args.images} devval images, {total} patches ({args.backbone}, {ex.size} px)\n")
    print(
        table(
            [
                ("bare trunk on ready tensors (bound)", f"{rates['bound']:.0f}", "1.00"),
                ("exact mode pipeline", f"{rates['exact']:.0f}", f"{rates['exact'] / rates['bound']:.2f}"),
                (
                    "PIL crop + resize per patch, same trunk",
                    f"{rates['crops']:.0f}",
                    f"{rates['crops'] / rates['bound']:.2f}",
                ),
                (
                    "naive: PIL crops, fp32 NCHW unfused model",
                    f"{rates['naive']:.0f}",
                    f"{rates['naive'] / rates['bound']:.2f}",
                ),
            ],
            ("path", "patches/s", "of bound"),
        )
    )
    of_bound, of_naive = rates["exact"] / rates["bound"], rates["exact"] / rates["naive"]
    print(f"\nexact / bound = {of_bound:.2f}; exact / naive = {of_naive:.2f}")


if __name__ == "__main__":
    main()
