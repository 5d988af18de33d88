#!/usr/bin/env python
"""Runs compared on their held-out training images, with the noise of the comparison.

For each run's checkpoint, scores the training images its run held out (``train.holdout`` of the training
split, drawn with ``train.seed``: the images best.pt and the fusion were chosen on, never trained on) and its
validation split, as ``patchnet eval`` scores them: fused with the max-pool SVM where the run fitted one, and
the head alone. The features come from each checkpoint's own trunk (an unlocked run's trained stages
included), so the held-out images are extracted once per trunk (about a minute for 200 VOC images).

The noise: a paired bootstrap over the held-out images (the same resampled images for every run), of each
run's 11-point mAP minus the first run's; a gain is real where its interval excludes 0. All runs must hold out
the same images (the same training split, holdout and seed).

    python benchmarks/heldout.py checkpoints/voc07_dev/last.pt checkpoints/unlock/u1_lr0.1/last.pt
    python benchmarks/heldout.py A/last.pt B/last.pt --per-class --json out.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from patchnet.data import Dataset, open_split
from patchnet.evaluation.metrics import ap_table, voc_ap
from patchnet.evaluation.predictor import Predictor
from patchnet.evaluation.scoring import evaluation_items, image_scores
from patchnet.features.build import build_features, cache_spec
from patchnet.head.pooling import pool_features
from patchnet.training.splits import holdout_records

from common import bench_parser, machine, table


def split_scores(predictor: Predictor, dataset: Dataset) -> dict:
    """The (images, C) scores of ``dataset`` fused (as the checkpoint scores) and by the head alone, its labels."""
    recipe = predictor.recipe
    store = build_features(cache_spec(recipe, predictor.extractor, codec=predictor.codec), dataset, predictor.extractor)
    items = evaluation_items(store)
    head = image_scores(predictor.head, store, items, recipe.pool, predictor.pool)
    fused, svm = head, np.full_like(head, np.nan)
    if predictor.fusion is not None:  # as image_scores fuses, from the head's pooled scores computed once
        svm = predictor.fusion.decision(pool_features(store.trunk_rows, store.offsets, items, "max"))
        fused = predictor.fusion.combine(head, svm)
    ids = [dataset.records[r].image_id for r in store.record[items]]
    labels = dataset.labels()[store.record[items]]
    return {"ids": ids, "fused": fused, "head": head, "svm": svm, "labels": labels}


def held_out_split(predictor: Predictor) -> Dataset:
    """The training images ``predictor``'s run held out."""
    recipe = predictor.recipe
    train = open_split(recipe.data, recipe.data.train_split, classes=predictor.classes)
    held = holdout_records(len(train), recipe.train.holdout, recipe.train.seed)
    if not len(held):
        raise SystemExit(f"{recipe.name}: its run held out no training images (train.holdout=0)")
    return Dataset(f"{train.name} held out", train.classes, [train.records[i] for i in held], train.fixes)


def bootstrap_gain(base: dict, other: dict, key: str, repeats: int, seed: int = 0) -> tuple[float, float, float]:
    """The 11-point mAP of ``other`` minus ``base`` on the same images, and its 95% paired bootstrap interval."""
    labels, classes = base["labels"], [str(c) for c in range(base["labels"].shape[1])]
    gain = ap_table(other[key], labels, classes).map07 - ap_table(base[key], labels, classes).map07
    n = len(base["ids"])
    draws = np.random.default_rng(seed).integers(0, n, (repeats, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
    diff = np.stack(
        [
            voc_ap(other[key][:, c], labels[:, c], weights=counts)
            - voc_ap(base[key][:, c], labels[:, c], weights=counts)
            for c in range(len(classes))
        ],
        1,
    )
    for r in range(min(repeats, 3)):  # a weighted AP is the AP of the drawn images
        d, c = draws[r], 0
        expected = voc_ap(other[key][d, c], labels[d, c]) - voc_ap(base[key][d, c], labels[d, c])
        assert np.isclose(diff[r, c], expected, equal_nan=True), (diff[r, c], expected)
    lo, hi = np.percentile(np.nanmean(diff, 1), [2.5, 97.5])  # a class without positives in a draw is left out
    return gain, float(lo), float(hi)


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoints", nargs="+", help="checkpoints (.pt) of runs on the same training split")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples of the held-out images")
    ap.add_argument("--cache-dir", help="feature cache folder (default: each run's runtime.cache_dir)")
    ap.add_argument("--per-class", action="store_true", help="also the per-class 11-point AP (fused) of each run")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    runs = []
    for path in args.checkpoints:
        predictor = Predictor(path)
        if args.cache_dir:
            predictor.recipe.runtime.cache_dir = args.cache_dir
        held = split_scores(predictor, held_out_split(predictor))
        val_split = predictor.recipe.data.val_split
        val = split_scores(predictor, open_split(predictor.recipe.data, val_split, classes=predictor.classes))
        runs.append((path, predictor.classes, held, val))
    base_ids = runs[0][2]["ids"]
    for path, _, held, _ in runs[1:]:
        if held["ids"] != base_ids:
            raise SystemExit(f"{path} held out other images than {runs[0][0]} (split, train.holdout or train.seed)")
    rows, report = [], {"machine": machine(), "held_out_images": len(base_ids), "runs": {}}
    for path, classes, held, val in runs:
        t = {k: ap_table(s[key], s["labels"], classes) for k, (s, key) in _tables(held, val).items()}
        first = held is runs[0][2]  # the reference: no gain over itself to resample
        gains = [
            (0.0, 0.0, 0.0) if first else bootstrap_gain(runs[0][2], held, k, args.bootstrap) for k in ("fused", "head")
        ]
        rows.append(
            (
                path,
                f"{100 * t['held fused'].map07:.1f} / {100 * t['held head'].map07:.1f}",
                "the reference"
                if first
                else " / ".join(f"{100 * g:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for g, lo, hi in gains),
                f"{100 * t['val fused'].map07:.1f} / {100 * t['val fused'].map:.1f}",
                f"{100 * t['val head'].map07:.1f} / {100 * t['val head'].map:.1f}",
                f"{100 * t['held svm'].map07:.1f} / {100 * t['val svm'].map07:.1f}" if "held svm" in t else "-",
            )
        )
        report["runs"][path] = {
            **{k: {"map07": v.map07, "map": v.map, "ap07": dict(zip(classes, v.ap07.tolist()))} for k, v in t.items()},
            "gain_fused": gains[0],
            "gain_head": gains[1],
        }
    print(f"\nmachine: {machine()}; {len(base_ids)} held-out training images, {args.bootstrap} paired resamples\n")
    headers = (
        "checkpoint",
        "held-out mAP 11-pt (fused / head)",
        "gain over the first, 95% interval (fused / head)",
        "val fused 11-pt / env",
        "val head alone",
        "SVM alone held-out / val",
    )
    print(table(rows, headers))
    if args.per_class:
        _per_class(report, [p for p, *_ in runs], runs[0][1])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


def _per_class(report: dict, paths: list[str], classes: list[str]) -> None:
    """The validation split's 11-point AP per class: the first run's max-pool SVM alone, then every run fused."""
    if "val svm" not in report["runs"][paths[0]]:
        raise SystemExit(f"--per-class compares with the first run's max-pool SVM; {paths[0]} has no fusion")
    cols = [(paths[0], "val svm"), *((p, "val fused") for p in paths)]
    rows = [(c, *(f"{100 * report['runs'][p][k]['ap07'][c]:.1f}" for p, k in cols)) for c in classes]
    rows.append(("mAP", *(f"{100 * report['runs'][p][k]['map07']:.1f}" for p, k in cols)))
    names = [f"{Path(paths[0]).parent.name} SVM alone", *(Path(p).parent.name for p in paths)]
    print("\nvalidation split, 11-point AP per class (fused but the first column)\n")
    print(table(rows, ("class", *names)))


def _tables(held: dict, val: dict) -> dict:
    tables = {
        "held fused": (held, "fused"),
        "held head": (held, "head"),
        "val fused": (val, "fused"),
        "val head": (val, "head"),
    }
    if np.isfinite(val["svm"]).all():  # the run's max-pool SVM alone, where it fitted one
        tables.update({"held svm": (held, "svm"), "val svm": (val, "svm")})
    return tables


if __name__ == "__main__":
    main()
