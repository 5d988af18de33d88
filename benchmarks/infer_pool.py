#!/usr/bin/env python
"""The power-k mean's k at inference: a trained run's scores for several k, chosen on held-out images.

For a run's ``last.pt`` (its recipe and cache), pools the head's softmax outputs over each image's
patches with the power-k mean for every ``--k`` (the run itself was scored with its recipe's
``pool.k``), refits the fusion weight with the max-pool SVM on the held-out training images for each
row, as training fits it, and scores the held-out images (where the choice is made) and the
validation split (reported only, never chosen on).

    python benchmarks/infer_pool.py checkpoints/voc07_dev/last.pt --cache-dir <the run's cache>
"""

from __future__ import annotations

import dataclasses

from patchnet.evaluation.scoring import image_scores

from common import bench_parser, fused_tables, run_scores, table


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", required=True, help="the cache the run was trained from")
    ap.add_argument("--k", type=float, nargs="+", default=[1, 2, 3, 5, 8, 12, 20])
    args = ap.parse_args()

    run = run_scores(args.checkpoint, args.cache_dir)
    predictor, sel = run.predictor, run.selection
    recipe, head = predictor.recipe, predictor.head
    if predictor.pool != "power":
        raise SystemExit(f"{args.checkpoint}: its run scores images with {predictor.pool!r}, not the power-k mean")
    rows = []
    for k in args.k:
        cfg = dataclasses.replace(recipe.pool, k=k)
        s_scores = image_scores(head, sel.data.store, sel.items, cfg, "power")
        v_scores = image_scores(head, run.store, run.items, cfg, "power")
        fusion, (s_head, s_fused, v_head, v_fused, _) = fused_tables(
            run, s_scores, run.sel_pooled, v_scores, run.val_pooled
        )
        rows.append(
            (
                f"{k:g}" + (" (the run's)" if k == recipe.pool.k else ""),
                f"{100 * s_head.map07:.1f} / {100 * s_fused.map07:.1f}",
                fusion.weight_text(),
                f"{100 * v_head.map07:.1f} / {100 * v_fused.map07:.1f} / {100 * v_fused.map:.1f}",
            )
        )
    print(table(rows, ["k", "held-out 11-pt head / fused", "weight", "val 11-pt head / fused / fused env"]))


if __name__ == "__main__":
    main()
