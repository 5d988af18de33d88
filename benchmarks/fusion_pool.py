#!/usr/bin/env python
"""The fused SVM's image feature: patch features max-pooled (as training fits it), mean-pooled, or both.

For a run's ``last.pt`` (its recipe and cache), fits the linear SVM of the fusion on the training images not
held out for each pooling (``maxmean``: the L2-normalised max- and mean-pooled features side by side),
refits the fusion weight on the held-out images and scores them (where the choice is made) and the
validation split (reported only, never chosen on).

    python benchmarks/fusion_pool.py checkpoints/voc07_dev/last.pt --cache-dir <the run's cache>
"""

from __future__ import annotations

import dataclasses

import numpy as np

from patchnet.evaluation.metrics import ap_table
from patchnet.head.pooling import l2_normalize, pool_features
from patchnet.studies.linear import SplitFeatures, fit_linear, linear_arrays
from patchnet.training.splits import held_out

from common import RunScores, bench_parser, fused_tables, run_scores, table

POOLS = ("max", "mean", "maxmean")


def pooled(store, items: np.ndarray, how: str) -> np.ndarray:
    if how != "maxmean":
        return pool_features(store.trunk_rows, store.offsets, items, how)
    return np.concatenate([l2_normalize(pooled(store, items, p)) for p in ("max", "mean")], 1)


def with_svm(run: RunScores, how: str) -> RunScores:
    """``run`` with its SVM fitted on ``how``-pooled features of the training images not held out, as training
    fits the max-pooled one (``SelectionEval.fit_svm``), and the held-out and val features pooled alike."""
    data, sel = run.train_data, run.selection
    items = np.flatnonzero(data.store.ok & ~held_out(data, sel))
    x = pooled(data.store, items, how)
    ids = [data.dataset.records[r].image_id for r in data.store.record[items]]
    model = fit_linear(
        SplitFeatures(ids, x, data.image_labels(items), data.dataset.classes),
        seed=run.predictor.recipe.train.seed,
        progress=False,
    )
    coef, intercept = linear_arrays(model, x.shape[1])
    return dataclasses.replace(
        run,
        coef=coef,
        intercept=intercept,
        sel_pooled=pooled(sel.data.store, sel.items, how),
        val_pooled=pooled(run.store, run.items, how),
    )


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", required=True, help="the cache the run was trained from")
    ap.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    args = ap.parse_args()

    run = run_scores(args.checkpoint, args.cache_dir)  # its SVM is training's, on max-pooled features
    names = [str(i) for i in range(len(run.predictor.classes))]
    rows = []
    for how in args.pools:
        r = run if how == "max" else with_svm(run, how)
        fusion, (_, held, _, val_fused, val_svm) = fused_tables(
            r, r.sel_scores, r.sel_pooled, r.val_scores, r.val_pooled
        )
        held_svm = ap_table(fusion.decision(r.sel_pooled), r.sel_labels, names)
        rows.append(
            (
                how + (" (training's)" if how == "max" else ""),
                f"{100 * held_svm.map07:.1f} / {100 * held.map07:.1f}",
                fusion.weight_text(),
                f"{100 * val_svm.map07:.1f} / {100 * val_fused.map07:.1f} / {100 * val_fused.map:.1f}",
            )
        )
    print(table(rows, ("SVM feature", "held-out 11-pt SVM / fused", "weight", "val 11-pt SVM / fused / fused env")))


if __name__ == "__main__":
    main()
