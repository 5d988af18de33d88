#!/usr/bin/env python
"""One fusion weight for every class, or one per class: measured on a trained run's cached features.

For a run's ``last.pt`` (its recipe and cache), fits the max-pool SVM as training does, then compares
the fusion weight chosen per class (shrunk towards the one shared weight by the class's held-out
positives) with the shared weight:

- ``held-out CV``: the held-out training images split in two at random, weights chosen on one half and
  scored on the other, both ways, averaged over ``--repeats`` splits (the same ones for every row); the
  choice of method is made on this row, never on the validation split;
- ``val``: chosen on all the held-out images, scored on the validation split (reported only).

    python benchmarks/fusion_weights.py checkpoints/voc07_dev/last.pt --cache-dir <the run's cache>
"""

from __future__ import annotations

import numpy as np

from patchnet.evaluation.metrics import ap_table
from patchnet.head.fusion import fit_fusion

from common import bench_parser, run_scores, table

# the shrinkage strengths compared (0: each class's own best weight; None: one weight for all)
SHRINKS = (None, 0.0, 5.0, 10.0, 20.0, 40.0)
SHOWN = 10.0  # the per-class column of the per-class table


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", required=True, help="the cache the run was trained from")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    run = run_scores(args.checkpoint, args.cache_dir)
    predictor, pool, coef, intercept = run.predictor, run.predictor.pool, run.coef, run.intercept
    sel_scores, sel_pooled, sel_labels = run.sel_scores, run.sel_pooled, run.sel_labels
    val_scores, val_pooled, val_labels = run.val_scores, run.val_pooled, run.val_labels

    # the SVM's decisions depend on no weight: computed once
    shared, _ = fit_fusion(pool, coef, intercept, sel_scores, sel_pooled, sel_labels)
    sel_decisions, val_decisions = shared.decision(sel_pooled), shared.decision(val_pooled)
    val_svm = ap_table(val_decisions, val_labels, predictor.classes)
    names = [str(i) for i in range(sel_labels.shape[1])]
    val_head = ap_table(val_scores, val_labels, predictor.classes)
    rows = [
        ("max-pool SVM alone (no boxes)", "", f"{100 * val_svm.map07:.1f} / {100 * val_svm.map:.1f}", ""),
        ("the head alone", "", f"{100 * val_head.map07:.1f} / {100 * val_head.map:.1f}", ""),
    ]
    rng = np.random.default_rng(0)
    n = len(sel_labels)
    perms = [rng.permutation(n) for _ in range(args.repeats)]  # the same halvings for every row: paired
    fused = {}
    for shrink in SHRINKS:
        cv = []
        for perm in perms:
            halves = perm[: n // 2], perm[n // 2 :]
            for a, b in (halves, halves[::-1]):
                f, _ = fit_fusion(pool, coef, intercept, sel_scores[a], sel_pooled[a], sel_labels[a], shrink=shrink)
                cv.append(ap_table(f.combine(sel_scores[b], sel_decisions[b]), sel_labels[b], names).map07)
        f, _ = fit_fusion(pool, coef, intercept, sel_scores, sel_pooled, sel_labels, shrink=shrink)
        v = fused[shrink] = ap_table(f.combine(val_scores, val_decisions), val_labels, predictor.classes)
        weights = np.atleast_1d(f.weight)
        rows.append(
            (
                "one weight" if shrink is None else f"per class, shrink {shrink:g}",
                f"{100 * np.mean(cv):.2f}",
                f"{100 * v.map07:.1f} / {100 * v.map:.1f}",
                " ".join(f"{w:.2g}" for w in weights),
            )
        )
    print(table(rows, ["fusion weight", "held-out CV mAP 11-pt", "val mAP 11-pt / env", "weights"]))
    per_class = [
        (
            c,
            f"{100 * val_svm.ap07[i]:.1f}",
            f"{100 * fused[None].ap07[i]:.1f}",
            f"{100 * fused[SHOWN].ap07[i]:.1f}",
        )
        for i, c in enumerate(predictor.classes)
    ]
    print(
        table(
            per_class,
            ["class (val AP 11-pt)", "max-pool SVM", "fused, one weight", f"fused, shrink {SHOWN:g}"],
        )
    )


if __name__ == "__main__":
    main()
