#!/usr/bin/env python
"""The detection head (``train.detector: mil``) beside the score-map boxes and the whole image, from one checkpoint.

CorLoc on the checkpoint's own held-out training images (the 200 devtrain images best.pt was chosen on: the
discovery protocol of the weakly supervised detection papers, on images the head did not train on) and on
``--split``; detection AP@0.5 per class on ``--split``; the AP of the detection head's WSDDN image scores beside
the classification head's. The score-map method runs with the recipe's ``infer.box_threshold`` and
``infer.map_prior``. ``--sheet N`` draws the detection head's boxes on N images of the split (``--sheet-ids``
picks them) into one picture.

    python benchmarks/detector.py checkpoints/voc07_boxes/last.pt --sheet 12 --sheet-out docs/detector_devval.jpg
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from localize import _split

from patchnet.evaluation.localize import evaluate_detector, evaluate_localization
from patchnet.evaluation.metrics import ap_table
from patchnet.evaluation.predictor import Predictor
from patchnet.evaluation.scoring import evaluation_items, image_scores
from patchnet.features.build import cache_spec
from patchnet.store.codec import FeatureCodec
from patchnet.training.splits import holdout_records
from patchnet.training.unlock import build_maps

from common import REPO, Timer, bench_parser, box_sheet, machine, require_voc, table


def _methods(predictor: Predictor, name: str, voc: Path, held: bool) -> dict:
    """Every box method on split ``name`` (its held-out images where ``held``): method -> (result, seconds)."""
    r, ex = predictor.recipe, predictor.extractor
    dataset, store = _split(predictor, name, voc)
    records = holdout_records(len(dataset), r.train.holdout or 0.1, r.train.seed) if held else None
    items = evaluation_items(store, records)
    scores = image_scores(predictor.head, store, items, r.pool, predictor.pool, predictor.fusion)
    maps = build_maps(cache_spec(r, ex, codec=FeatureCodec()), dataset, ex, None)
    map_items = evaluation_items(maps, records)
    out = {}
    with Timer() as clock:
        result, wsddn = evaluate_detector(
            predictor.detector, maps, dataset, map_items, r.detector, predictor.geometry, ex.autocast_dtype, False
        )
    out["mil"] = (result, clock.seconds)
    labels = dataset.labels()
    out["classification"] = (
        ap_table(wsddn, labels[maps.record[map_items]], list(dataset.classes)),
        ap_table(scores, labels[store.record[items]], list(dataset.classes)),
    )
    for method in ("map", "whole"):
        with Timer() as clock:
            result = evaluate_localization(
                predictor.head,
                store,
                dataset,
                items,
                scores,
                predictor.pool,
                method,
                r.infer.box_threshold,
                r.infer.map_prior,
                progress=False,
            )
        out[method] = (result, clock.seconds)
    out["images"] = len(items)
    return out


def main() -> None:
    ap = bench_parser(__doc__, recipe=None, sets=False)  # the checkpoint carries its recipe
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="devval")
    ap.add_argument("--sheet", type=int, default=0, help="draw the detection head's boxes on this many images")
    ap.add_argument("--sheet-ids", nargs="*", default=[], help="the images of the sheet (default: the first)")
    ap.add_argument("--sheet-out", default=str(REPO / "docs" / "detector_devval.jpg"))
    ap.add_argument("--json", default="", help="write every figure here")
    args = ap.parse_args()
    voc = require_voc(Path(args.voc))
    predictor = Predictor(args.checkpoint)
    if predictor.detector is None:
        raise SystemExit(f"{args.checkpoint} has no detection head: train it with train.detector: mil")
    held = _methods(predictor, predictor.recipe.data.train_split, voc, held=True)
    val = _methods(predictor, args.split, voc, held=False)
    rows, report = [], {}
    for method, label in (
        ("mil", "detection head (WSDDN + OICR)"),
        ("map", "score map"),
        ("whole", "baseline: the whole image"),
    ):
        h, v = held[method][0].means(), val[method][0].means()
        rows.append(
            (
                label,
                f"{100 * h['corloc']:.1f}",
                f"{100 * v['corloc']:.1f}",
                f"{100 * v['det_map07']:.1f}",
                f"{100 * v['det_map']:.1f}",
                f"{val[method][1]:.0f}",
            )
        )
        report[method] = {"held_out": held[method][0].to_dict(), args.split: val[method][0].to_dict()}
    per_class = []
    mil, smap, whole = (val[m][0] for m in ("mil", "map", "whole"))
    for c, name in enumerate(mil.classes):
        per_class.append(
            (
                name,
                f"{int(mil.pairs[c])}",
                *(f"{100 * r.corloc[c]:.1f}" for r in (mil, smap, whole)),
                *(f"{100 * r.ap07[c]:.1f}" for r in (mil, smap, whole)),
            )
        )
    means = [r.means() for r in (mil, smap, whole)]
    per_class.append(
        (
            "**mean**",
            f"{int(mil.pairs.sum())}",
            *(f"**{100 * m['corloc']:.1f}**" for m in means),
            *(f"**{100 * m['det_map07']:.1f}**" for m in means),
        )
    )
    wsddn, head = val["classification"]
    print(
        f"\nmachine: {machine()}; CorLoc = mean over classes of the share of positive image-class pairs whose top box "
        f"overlaps a box of the class at IoU >= 0.5; detection AP at IoU 0.5 (VOC devkit, 11-point / envelope); "
        f"held-out devtrain: {held['images']} images, {args.split}: {val['images']} images\n"
    )
    print(
        table(
            rows, ("boxes", "CorLoc held-out devtrain %", f"CorLoc {args.split} %", "det mAP 11-pt", "det mAP env", "s")
        )
    )
    print()
    print(
        table(
            per_class,
            (
                "class",
                "pairs",
                "CorLoc: detection head",
                "score map",
                "whole image",
                "det AP: detection head",
                "score map",
                "whole image",
            ),
        )
    )
    print(
        f"\nimage classification on {args.split} (mAP 11-pt / envelope): the detection head's WSDDN scores "
        f"{100 * wsddn.map07:.1f} / {100 * wsddn.map:.1f}; the classification head (as it scores, "
        f"pool {predictor.pool}{', fused' if predictor.fusion else ''}) {100 * head.map07:.1f} / {100 * head.map:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.sheet:
        _sheet(predictor, args.split, voc, args.sheet, args.sheet_ids, Path(args.sheet_out))


def _sheet(predictor: Predictor, split: str, voc: Path, count: int, ids: list[str], out: Path) -> None:
    """The detection head's boxes (up to 3 per class present in the image) on ``count`` images, tiled."""
    from patchnet.api import _detection
    from patchnet.data import load_image, open_split

    dataset = open_split(predictor.recipe.data, split, predictor.classes)
    by_id = {rec.image_id: rec for rec in dataset.records}
    records = [by_id[i] for i in ids] if ids else dataset.records[:count]
    drawn = []
    for rec in records[:count]:
        image = load_image(rec.path)
        present = [int(c) for c in np.flatnonzero(rec.labels == 1)]
        drawn.append((image, [_detection(*d) for d in predictor.detect(image, present)]))
    box_sheet(drawn, dataset.classes, out)


if __name__ == "__main__":
    main()
