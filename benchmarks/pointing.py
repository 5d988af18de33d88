#!/usr/bin/env python
"""The pointing game of trained checkpoints, with the map prior chosen on held-out training images.

Score maps average each pixel's covering patches; near the borders few patches overlap, and one
high patch dominates the mean. `infer.map_prior` adds pseudo-patches of the image's mean value to
every pixel. The prior is chosen here on the checkpoint's own held-out training images (never on the
reported split), then the pointing game is played on devval beside the centre-point baseline.

    python benchmarks/pointing.py checkpoints/baseline/baseline_both/last.pt \
        checkpoints/baseline/baseline_images/last.pt
"""

from __future__ import annotations

from pathlib import Path

from patchnet.data import open_split
from patchnet.evaluation.maps import pointing_game
from patchnet.evaluation.predictor import Predictor
from patchnet.evaluation.scoring import evaluation_items
from patchnet.features.build import build_features, cache_spec
from patchnet.training.splits import holdout_records

from common import bench_parser, machine, require_voc, table

PRIORS = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0)


def main() -> None:
    ap = bench_parser(__doc__, recipe=None, sets=False)  # each checkpoint carries its recipe
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--split", default="devval")
    ap.add_argument("--priors", nargs="*", type=float, default=list(PRIORS))
    args = ap.parse_args()
    voc = require_voc(Path(args.voc))
    rows = []
    for ckpt in args.checkpoints:
        predictor = Predictor(ckpt)
        recipe = predictor.recipe
        recipe.data.root = str(voc)
        recipe.data.boxes = True  # a model trained without boxes is still judged against them
        train = open_split(recipe.data, recipe.data.train_split, predictor.classes)
        # the cache as the checkpoint's head reads it: through its own projection and quantisation
        spec = cache_spec(recipe, predictor.extractor, train, codec=predictor.codec)
        store = build_features(spec, train, predictor.extractor)
        held = evaluation_items(store, holdout_records(len(train), recipe.train.holdout or 0.1, recipe.train.seed))
        chosen = {}
        for prior in args.priors:
            r = pointing_game(predictor.head, store, train, held, predictor.pool, prior).rates()
            chosen[prior] = r["all"] + r["hard"]
            print(
                f"{ckpt}: held-out training images, prior {prior:g}: all {100 * r['all']:.1f}%, "
                f"hard {100 * r['hard']:.1f}%",
                flush=True,
            )
        best = max(chosen, key=chosen.get)
        val = open_split(recipe.data, args.split, predictor.classes)
        vstore = build_features(spec, val, predictor.extractor)
        items = evaluation_items(vstore)
        for prior in sorted({0.0, best}):
            r = pointing_game(predictor.head, vstore, val, items, predictor.pool, prior).rates()
            rows.append(
                (
                    Path(ckpt).parent.name + "/" + Path(ckpt).name,
                    recipe.train.supervision,
                    predictor.pool,
                    f"{prior:g}" + (" (chosen)" if prior == best else ""),
                    f"{100 * r['all']:.1f}",
                    f"{100 * r['all_centre']:.1f}",
                    f"{100 * r['hard']:.1f}",
                    f"{100 * r['hard_centre']:.1f}",
                    f"{r['pairs']} / {r['hard_pairs']}",
                )
            )
    print(f"\nmachine: {machine()}; pointing game on {args.split}, 15 px tolerance, mean maps\n")
    print(
        table(
            rows,
            (
                "checkpoint",
                "supervision",
                "maps of",
                "prior",
                "all %",
                "centre %",
                "harder %",
                "centre, harder %",
                "pairs / harder",
            ),
        )
    )


if __name__ == "__main__":
    main()
