#!/usr/bin/env python
"""patchnet against the "CNN features off-the-shelf" baseline with the same backbone, in one run.

The baseline: one forward pass on the whole image and one on its mirror image (features averaged),
L2-normalised, a linear SVM per class with C chosen by cross-validation on devtrain — the same as
`patchnet linear`. patchnet: the recipe's patch training (or a given checkpoint), scored by
`patchnet eval`'s code. Both are trained on devtrain and scored on devval.

    python benchmarks/baseline.py                                   # trains recipes/voc07_dev.yaml
    python benchmarks/baseline.py --checkpoint checkpoints/voc07_dev/best.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import DEV_RECIPE, Timer, machine, require_voc, table, VOC
from patchnet.infer import evaluate_split
from patchnet.linear import linear_baseline, whole_image_recipe
from patchnet.recipe import load_recipe
from patchnet.train import build_extractor, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", default=str(VOC))
    ap.add_argument("--recipe", default=str(DEV_RECIPE))
    ap.add_argument("--checkpoint", help="score this patchnet run instead of training one")
    ap.add_argument("--method", default="svm", choices=["svm", "logreg"])
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    voc = require_voc(Path(args.voc))
    recipe = load_recipe(args.recipe, [f"data.root={voc}", *args.set])
    with Timer() as t_base:
        base, model = linear_baseline(whole_image_recipe(recipe), recipe.data.train_split, recipe.data.val_split,
                                      build_extractor, args.method)
    with Timer() as t_patch:
        if args.checkpoint:
            ours, _ = evaluate_split(args.checkpoint, data=voc, split=recipe.data.val_split)
        else:
            ours = evaluate_split(train(recipe).run_dir / "best.pt", data=voc, split=recipe.data.val_split)[0]
    print(f"\nmachine: {machine()}; backbone {recipe.backbone.name}; "
          f"{recipe.data.train_split} -> {recipe.data.val_split}\n")
    rows = [(c, f"{100 * a:.1f}", f"{100 * b:.1f}", f"{100 * (b - a):+.1f}", f"{100 * d:.1f}", f"{100 * e:.1f}")
            for c, a, b, d, e in zip(base.classes, base.ap07, ours.ap07, base.ap, ours.ap)]
    rows.append(("mAP", f"{100 * base.map07:.1f}", f"{100 * ours.map07:.1f}", f"{100 * (ours.map07 - base.map07):+.1f}",
                 f"{100 * base.map:.1f}", f"{100 * ours.map:.1f}"))
    print(table(rows, ("class", "baseline 11-pt", "patchnet 11-pt", "gain", "baseline env", "patchnet env")))
    print(f"\nbaseline ({args.method}, whole image + mirror): {t_base.seconds / 60:.1f} min; "
          f"patchnet ({'given checkpoint' if args.checkpoint else 'trained here'}): {t_patch.seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
