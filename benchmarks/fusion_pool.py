#!/usr/bin/env python
"""The fused SVM's image feature: patch features max-pooled (as training fits it), mean-pooled, or both.

For a run's ``last.pt`` (its recipe and cache), fits the linear SVM of the fusion on the training images not
held out for each pooling (``maxmean``: the L2-normalised max- and mean-pooled features side by side),
refits the fusion weight on the held-out images and scores them (where the choice is made) and the
validation split (reported only, never chosen on).

    python benchmarks/fusion_pool.py checkpoints/voc07_dev/last.pt --cache-dir <the run's cache>
"""

from __future__ import annotations

import numpy as np

from patchnet.fusion import fit_fusion
from patchnet.infer import Predictor, image_scores
from patchnet.linear import SplitFeatures, fit_linear, linear_arrays
from patchnet.metrics import ap_table
from patchnet.pooling import l2_normalize, pool_features
from patchnet.splits import held_out

from common import bench_parser, run_splits, table

POOLS = ("max", "mean", "maxmean")


def pooled(store, items: np.ndarray, how: str) -> np.ndarray:
    if how != "maxmean":
        return pool_features(store.trunk_rows, store.offsets, items, how)
    return np.concatenate([l2_normalize(pooled(store, items, p)) for p in ("max", "mean")], 1)


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", required=True, help="the cache the run was trained from")
    ap.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    args = ap.parse_args()

    predictor = Predictor(args.checkpoint, fuse=False)
    recipe, head, pool = predictor.recipe, predictor.head, predictor.pool
    data, sel, val, store, items = run_splits(predictor, args.cache_dir)
    train_items = np.flatnonzero(data.store.ok & ~held_out(data, sel))
    ids = [data.dataset.records[r].image_id for r in data.store.record[train_items]]
    sel_labels, val_labels = sel.labels(), val.labels()[store.record[items]]
    sel_scores = image_scores(head, sel.data.store, sel.items, recipe.pool, pool)
    val_scores = image_scores(head, store, items, recipe.pool, pool)
    names = [str(i) for i in range(len(predictor.classes))]
    rows = []
    for how in args.pools:
        x = pooled(data.store, train_items, how)
        model = fit_linear(
            SplitFeatures(ids, x, data.image_labels(train_items), data.dataset.classes),
            seed=recipe.train.seed,
            progress=False,
        )
        coef, intercept = linear_arrays(model, x.shape[1])
        sel_x, val_x = pooled(sel.data.store, sel.items, how), pooled(store, items, how)
        fusion, _ = fit_fusion(pool, coef, intercept, sel_scores, sel_x, sel_labels)
        held_svm, val_svm = (
            ap_table(fusion.decision(sel_x), sel_labels, names),
            ap_table(fusion.decision(val_x), val_labels, predictor.classes),
        )
        held = ap_table(fusion.combine(sel_scores, fusion.decision(sel_x)), sel_labels, names)
        val_fused = ap_table(fusion.combine(val_scores, fusion.decision(val_x)), val_labels, predictor.classes)
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
