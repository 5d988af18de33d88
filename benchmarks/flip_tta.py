#!/usr/bin/env python
"""Test-time mirroring: a trained run's scores with and without the mirror image's patches.

For a run's ``last.pt`` (its recipe and cache), extracts the patches of every held-out training image
and every validation image mirrored left-right, and scores each image from the union of its own
patches and its mirror's (the head's pooling over both sets; the max-pool SVM on the maximum over
both). The fusion weight is refitted on the held-out images for each row, as training fits it. The
choice is made on the held-out rows, never on the validation split (reported only).

    python benchmarks/flip_tta.py checkpoints/voc07_dev/last.pt --cache-dir <the run's cache>
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from patchnet.data import load_image
from patchnet.evaluation.predictor import Predictor
from patchnet.head.pooling import pool_image

from common import bench_parser, fused_tables, run_scores, table


def mirrored(predictor: Predictor, store, dataset, items: np.ndarray, desc: str):
    """(I, C) head scores over each image's patches and its mirror's, and (I, d) max-pooled trunk features
    over both; also the seconds per image that mirroring adds (decoding, extraction, head and pooling)."""
    recipe, head, codec = predictor.recipe, predictor.head, predictor.codec
    scores, pooled, started = [], [], time.perf_counter()
    for i in tqdm(items, desc=desc):
        rec = dataset.records[store.record[i]]
        image = load_image(rec.path, recipe.data.max_pixels)[:, ::-1]
        flipped, _ = predictor.extractor.extract(image)
        flipped = codec.roundtrip(flipped)
        own = store.item_slice(int(i))
        logits = torch.cat([head.logits(store.rows[own]), head.logits(flipped)])
        scores.append(pool_image(logits, recipe.pool, predictor.pool))
        both = np.concatenate([np.asarray(store.trunk_rows[own]), codec.unproject(flipped)])
        pooled.append(both.max(0))
    return np.stack(scores), np.stack(pooled), (time.perf_counter() - started) / len(items)


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", required=True, help="the cache the run was trained from")
    args = ap.parse_args()

    run = run_scores(args.checkpoint, args.cache_dir)
    predictor, sel = run.predictor, run.selection
    sel_tta = mirrored(predictor, sel.data.store, sel.data.dataset, sel.items, "held-out, mirrored")
    val_tta = mirrored(predictor, run.store, run.val, run.items, "val, mirrored")

    rows = []
    for name, (s_scores, s_pooled), (v_scores, v_pooled) in (
        ("as trained", (run.sel_scores, run.sel_pooled), (run.val_scores, run.val_pooled)),
        ("with the mirror image", sel_tta[:2], val_tta[:2]),
    ):
        fusion, tables = fused_tables(run, s_scores, s_pooled, v_scores, v_pooled)
        s_head, s_fused, v_head, v_fused, v_svm = tables
        rows.append(
            (
                name,
                f"{100 * s_head.map07:.1f} / {100 * s_fused.map07:.1f}",
                fusion.weight_text(),
                f"{100 * v_head.map07:.1f} / {100 * v_fused.map07:.1f} / {100 * v_fused.map:.1f}",
                f"{100 * v_svm.map07:.1f}",
            )
        )
    print(
        table(
            rows,
            ["scores", "held-out 11-pt head / fused", "weight", "val 11-pt head / fused / fused env", "val SVM 11-pt"],
        )
    )
    print(f"the mirror image adds {sel_tta[2]:.3f} s/image (held-out), {val_tta[2]:.3f} s/image (val)")


if __name__ == "__main__":
    main()
