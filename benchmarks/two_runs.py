#!/usr/bin/env python
"""Two trained runs scored together (late fusion), for example two trunks on the same split.

For each run's ``last.pt`` (with its own cache), scores the held-out training images and the validation
split as ``patchnet eval`` does (the head's pooled score, fused with its max-pool SVM when the run fitted
one). The two scores are z-scored per class with the held-out images' statistics and added, the second
times a weight chosen by the held-out 11-point mAP; the validation split is reported only. Both runs
must hold out the same training images (the same split, ``train.holdout`` and ``train.seed``).

    python benchmarks/two_runs.py A/last.pt --cache-dir A_CACHE B/last.pt --cache-dir B_CACHE
"""

from __future__ import annotations

import numpy as np

from patchnet.evaluation.metrics import ap_table
from patchnet.evaluation.predictor import Predictor
from patchnet.evaluation.scoring import image_scores

from common import bench_parser, run_splits, table

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def scored(checkpoint: str, cache_dir: str):
    """(held-out record ids, held-out scores, held-out labels, val scores, val labels, classes) of one run."""
    predictor = Predictor(checkpoint)
    recipe, head, pool, fusion = predictor.recipe, predictor.head, predictor.pool, predictor.fusion
    _, sel, val, store, items = run_splits(predictor, cache_dir)
    sel_store = sel.data.store
    return (
        sel_store.record[sel.items],
        image_scores(head, sel_store, sel.items, recipe.pool, pool, fusion),
        sel.labels(),
        image_scores(head, store, items, recipe.pool, pool, fusion),
        val.labels()[store.record[items]],
        predictor.classes,
    )


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoints", nargs=2, help="the two runs' last.pt")
    ap.add_argument("--cache-dir", action="append", required=True, help="each run's cache, in the same order")
    args = ap.parse_args()
    if len(args.cache_dir) != 2:
        raise SystemExit(f"give --cache-dir once per checkpoint (two), got {len(args.cache_dir)}")

    a, b = (scored(c, d) for c, d in zip(args.checkpoints, args.cache_dir))
    if not np.array_equal(a[0], b[0]) or a[5] != b[5]:
        raise SystemExit("the two runs hold out different training images or have different classes")
    classes, sel_labels, val_labels = a[5], a[2], a[4]
    names = [str(i) for i in range(len(classes))]

    def z(run):  # per class, with the held-out images' statistics
        mean, std = run[1].mean(0), run[1].std(0) + 1e-12
        return (run[1] - mean) / std, (run[3] - mean) / std

    (sa, va), (sb, vb) = z(a), z(b)
    tried = {w: ap_table(sa + w * sb, sel_labels, names).map07 for w in WEIGHTS}
    best = max(tried, key=lambda w: (tried[w], -w))  # ties: the smaller weight
    rows = []
    for name, s, v in (
        ("first run", sa, va),
        ("second run", sb, vb),
        (f"first + {best:g} x second (weight chosen on held-out)", sa + best * sb, va + best * vb),
    ):
        held, vt = ap_table(s, sel_labels, names), ap_table(v, val_labels, classes)
        rows.append((name, f"{100 * held.map07:.1f}", f"{100 * vt.map07:.1f} / {100 * vt.map:.1f}"))
    print("held-out 11-pt by weight: " + ", ".join(f"{w:g}: {100 * m:.1f}" for w, m in tried.items()))
    print(table(rows, ("scores", "held-out 11-pt", "val 11-pt / env (reported only)")))


if __name__ == "__main__":
    main()
