#!/usr/bin/env python
"""Boxes from image labels: CorLoc and VOC detection AP of trained checkpoints, beside two baselines.

For each checkpoint, the map method's threshold (how far from the score map's minimum to its peak a
region starts) and map prior are chosen by CorLoc on the checkpoint's own held-out training images (the
200 devtrain images best.pt was chosen on; a model trained without boxes is judged against theirs),
never on the reported split. Then, on devval: the map method with that choice, with the default
threshold, and the two baselines (one box over the whole image; the single top-scoring patch).
``--sheet N`` draws the boxes of the first N devval images of the first checkpoint into one PNG.

    python benchmarks/localize.py checkpoints/voc07_dev/last.pt checkpoints/voc07_weak/last.pt \
        --sheet 12 --sheet-out docs/boxes_devval.jpg
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from patchnet.data import open_split
from patchnet.evaluation.localize import evaluate_localization
from patchnet.evaluation.predictor import Predictor
from patchnet.evaluation.scoring import evaluation_items, image_scores
from patchnet.features.build import build_features, cache_spec
from patchnet.training.splits import holdout_records

from common import REPO, Timer, bench_parser, box_sheet, machine, require_voc, table

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PRIORS = (0.0, 20.0)


def _split(predictor: Predictor, name: str, voc: Path):
    recipe = predictor.recipe
    recipe.data.root = str(voc)
    recipe.data.boxes = True  # judged against the boxes even where the model never saw one
    dataset = open_split(recipe.data, name, predictor.classes)
    spec = cache_spec(recipe, predictor.extractor, codec=predictor.codec)  # as the checkpoint's head reads it
    store = build_features(spec, dataset, predictor.extractor)
    return dataset, store


def choose(predictor: Predictor, voc: Path, thresholds, priors) -> tuple[float, float, dict]:
    """The (threshold, prior) of the best CorLoc on the held-out training images, and every CorLoc tried."""
    recipe = predictor.recipe
    train, store = _split(predictor, recipe.data.train_split, voc)
    held = evaluation_items(store, holdout_records(len(train), recipe.train.holdout or 0.1, recipe.train.seed))
    scores = image_scores(predictor.head, store, held, recipe.pool, predictor.pool, predictor.fusion)
    tried = {}
    for prior in priors:
        for t in thresholds:
            r = evaluate_localization(
                predictor.head, store, train, held, scores, predictor.pool, "map", t, prior, progress=False
            )
            tried[(t, prior)] = r.means()["corloc"]
            print(
                f"  held-out training images: threshold {t:g}, prior {prior:g}: CorLoc {100 * tried[(t, prior)]:.1f}",
                flush=True,
            )
    (t, prior) = max(tried, key=lambda k: (tried[k], -abs(k[0] - 0.5)))
    return t, prior, {f"{k[0]:g}/{k[1]:g}": v for k, v in tried.items()}


def main() -> None:
    ap = bench_parser(__doc__, recipe=None, sets=False)  # each checkpoint carries its recipe
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--split", default="devval")
    ap.add_argument("--thresholds", nargs="*", type=float, default=list(THRESHOLDS))
    ap.add_argument("--priors", nargs="*", type=float, default=list(PRIORS))
    ap.add_argument("--sheet", type=int, default=0, help="draw the boxes of this many images of the split")
    ap.add_argument("--sheet-out", default=str(REPO / "docs" / "boxes_devval.jpg"))
    ap.add_argument("--json", default="", help="write every figure here")
    args = ap.parse_args()
    voc = require_voc(Path(args.voc))
    rows, report = [], {}
    for ckpt in args.checkpoints:
        predictor = Predictor(ckpt)
        print(f"{ckpt}: choosing the threshold and prior on held-out training images", flush=True)
        t, prior, tried = choose(predictor, voc, args.thresholds, args.priors)
        val, vstore = _split(predictor, args.split, voc)
        items = evaluation_items(vstore)
        r = predictor.recipe
        scores = image_scores(predictor.head, vstore, items, r.pool, predictor.pool, predictor.fusion)
        runs = [
            ("map, chosen on held-out devtrain", "map", t, prior),
            ("map, the recipe's infer.box_threshold / map_prior", "map", r.infer.box_threshold, r.infer.map_prior),
            ("baseline: the whole image", "whole", 0.5, 0.0),
            ("baseline: the top-scoring patch", "patch", 0.5, 0.0),
        ]
        report[ckpt] = {"chosen": {"threshold": t, "prior": prior, "tried": tried}}
        for label, method, threshold, p in runs:
            with Timer() as clock:
                result = evaluate_localization(
                    predictor.head, vstore, val, items, scores, predictor.pool, method, threshold, p, progress=False
                )
            m = result.means()
            rows.append(
                (
                    Path(ckpt).parent.name,
                    label,
                    f"{threshold:g} / {p:g}" if method == "map" else "",
                    f"{100 * m['corloc']:.1f}",
                    f"{100 * m['det_map07']:.1f}",
                    f"{100 * m['det_map']:.1f}",
                    f"{clock.seconds:.0f}",
                )
            )
            report[ckpt][label] = result.to_dict()
            print(result.format() if method == "map" and threshold == t else "", flush=True)
        if args.sheet and ckpt == args.checkpoints[0]:
            _sheet(predictor, val, vstore, items[: args.sheet], scores, t, prior, Path(args.sheet_out))
    print(
        f"\nmachine: {machine()}; {args.split}, CorLoc = mean over classes of the share of positive image-class "
        "pairs whose first box overlaps a box of the class at IoU >= 0.5; detection AP at IoU 0.5 (VOC devkit)\n"
    )
    print(table(rows, ("run", "boxes", "threshold / prior", "CorLoc %", "det mAP 11-pt", "det mAP env", "seconds")))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _sheet(predictor, dataset, store, items, scores, threshold, prior, out: Path) -> None:
    """The first box of each class judged present in each image, drawn, tiled into one picture."""
    from patchnet.data import load_image
    from patchnet.evaluation.localize import confidence, localize
    from patchnet.head.pooling import map_values

    p = predictor
    # box scores in [0, 1]: localize takes the log of the image's confidence (calibrated probability, else squashed)
    sure = confidence(scores, p.pool, p.recipe.pool.k, p.calibration, p.fusion is not None)
    drawn = []
    for row, i in enumerate(items):
        rec = dataset.records[store.record[i]]
        s = store.item_slice(i)
        values = map_values(predictor.head.logits(store.rows[s]), predictor.pool).numpy()
        present = [int(c) for c in np.flatnonzero(rec.labels == 1)]  # the classes the image shows
        found = localize(
            store.patch_boxes[s],
            values,
            np.log(np.maximum(sure[row], 1e-300)),
            rec.width,
            rec.height,
            present,
            "map",
            threshold,
            prior,
            max_boxes=1,
        )
        drawn.append((load_image(rec.path), found))
    box_sheet(drawn, dataset.classes, out)


if __name__ == "__main__":
    main()
