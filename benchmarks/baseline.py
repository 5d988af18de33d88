#!/usr/bin/env python
"""The honest baseline table: box-free linear baselines against patchnet's three supervisions, in one run.

Every row uses the same frozen backbone, is trained on devtrain and scored on devval:
- whole image (and its mirror) at 224 and at 448 px, L2-normalised, a linear SVM per class (`patchnet linear`);
- the cached patch features of the recipe, mean- or max-pooled per image, the same linear SVM (no boxes used);
- patchnet trained with `train.supervision` boxes, images and both.

C is chosen per class by cross-validation on devtrain; patchnet rows are scored from `last.pt`, never
from a checkpoint chosen on devval. Per-class APs and the epoch times go to --out as JSON.

    python benchmarks/baseline.py                       # every row (about an hour on a 2-core CPU)
    python benchmarks/baseline.py --rows whole224 max both
    python benchmarks/baseline.py --rows max both --limit 300 \
        --backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from patchnet.checkpoint import load_checkpoint
from patchnet.evaluation.predictor import evaluate_split
from patchnet.evaluation.scoring import InferOptions
from patchnet.features.extract import build_extractor
from patchnet.studies.linear import linear_baseline, whole_image_recipe
from patchnet.training.trainer import train

from common import REPO, Timer, bench_parser, dev_recipe, machine, require_voc, table

ROWS = {
    "whole224": "whole image 224 + mirror, linear SVM",
    "whole448": "whole image 448 + mirror, linear SVM",
    "mean": "patch features mean-pooled per image, linear SVM",
    "max": "patch features max-pooled per image, linear SVM (no boxes)",
    "boxes": "patchnet, train.supervision=boxes",
    "images": "patchnet, train.supervision=images (no boxes)",
    "both": "patchnet, train.supervision=both",
}
# the supervisions' own settings; the recipe supplies everything else
SUPERVISION = {
    "boxes": ["train.supervision=boxes", "pool.name=power", "infer.pool="],
    "images": ["train.supervision=images", "pool.name=topk", "infer.pool=power"],
    "both": ["train.supervision=both", "pool.name=topk", "infer.pool=power"],
}


def run_rows(args, voc: Path, after: list[str], tag: str = "") -> tuple[dict, dict, dict]:
    """Every row of ``args.rows`` for the recipe with ``after`` (applied after --set): APTables, minutes and epoch
    seconds by row."""
    recipe = dev_recipe(args, f"runtime.output={args.out}", f"data.limit={args.limit}", after=after)
    results, seconds, epochs = {}, {}, {}
    for row in args.rows:
        with Timer() as t:
            if row in SUPERVISION:
                r = dev_recipe(
                    args,
                    f"runtime.output={args.out}",
                    f"name=baseline_{row}{tag}",
                    *SUPERVISION[row],
                    f"data.limit={args.limit}",
                    after=after,
                )
                result = train(r)
                results[row] = result.table  # last.pt on devval
                epochs[row] = _epoch_seconds(result.run_dir)
                if r.infer.fuse:  # the head alone, without the fused max-pool SVM
                    results[row + "_head"] = evaluate_split(
                        result.run_dir / "last.pt", data=voc, options=InferOptions(fuse=False)
                    )[0]
                    seconds[row + "_head"] = 0.0
            else:
                if row.startswith("whole"):
                    r = whole_image_recipe(recipe)
                    r = replace(r, backbone=replace(r.backbone, input_size=int(row[5:])))
                    pool = "mean"
                else:
                    r, pool = recipe, row
                results[row], _ = linear_baseline(
                    r, recipe.data.train_split, recipe.data.val_split, build_extractor, args.method, pool
                )
        seconds[row] = t.seconds
        print(
            f"{tag.lstrip('_') or recipe.backbone.name} {row}: mAP {100 * results[row].map07:.1f} (11-pt) "
            f"{100 * results[row].map:.1f} (env) in {t.seconds / 60:.1f} min",
            flush=True,
        )
    return results, seconds, epochs


def main() -> None:
    ap = bench_parser(__doc__, limit=0, limit_help="first N images of devtrain and of devval (0: all)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument(
        "--backbones",
        nargs="*",
        default=[],
        help="run the rows for each of these backbones and print them side by side (default: the recipe's)",
    )
    ap.add_argument("--method", default="svm", choices=["svm", "logreg"])
    ap.add_argument(
        "--out", default=str(REPO / "checkpoints" / "baseline"), help="folder for the runs and baseline.json"
    )
    args = ap.parse_args()
    voc = require_voc(Path(args.voc))
    if args.backbones:
        return compare_backbones(args, voc)
    recipe = dev_recipe(args, f"data.limit={args.limit}")
    results, seconds, epochs = run_rows(args, voc, [])

    print(
        f"\nmachine: {machine()}; backbone {recipe.backbone.name}; {recipe.data.train_split} -> "
        f"{recipe.data.val_split}; patchnet rows from last.pt\n"
    )
    rows = [
        (_label(k, results), f"{100 * v.map07:.1f}", f"{100 * v.map:.1f}", f"{seconds[k] / 60:.1f}")
        for k, v in results.items()
    ]
    print(table(rows, ("method", "mAP 11-pt", "mAP envelope", "minutes")))
    classes = next(iter(results.values())).classes
    per_class = [(c, *(f"{100 * v.ap07[i]:.1f}" for v in results.values())) for i, c in enumerate(classes)]
    print("\nper-class AP (11-point)\n")
    print(table(per_class, ("class", *results)))
    if "max" in results:
        for k in ("images", "both", "boxes"):
            if k in results:
                print(f"{k} - max-pool SVM: {100 * (results[k].map07 - results['max'].map07):+.1f} mAP (11-pt)")
    if epochs:
        print("\nmean epoch seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in epochs.items()))
        if "boxes" in epochs:
            for k in ("images", "both"):
                if k in epochs:
                    print(f"{k} epoch / boxes epoch: {epochs[k] / epochs['boxes']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "rows": {
                    k: {"label": _label(k, results), **v.to_dict(), "minutes": seconds[k] / 60}
                    for k, v in results.items()
                },
                "epoch_seconds": epochs,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out / 'baseline.json'}")


def compare_backbones(args, voc: Path) -> None:
    """The rows for each backbone, in one run: a table of methods against backbones."""
    by_backbone, minutes = {}, {}
    for name in args.backbones:
        results, seconds, _ = run_rows(args, voc, [f"backbone.name={name}"], tag="_" + name.replace("/", "_"))
        by_backbone[name], minutes[name] = results, sum(seconds.values()) / 60
    recipe = dev_recipe(args, f"data.limit={args.limit}")
    first = next(iter(by_backbone.values()))
    n = f"first {args.limit}" if args.limit else "all"
    print(
        f"\nmachine: {machine()}; {n} {recipe.data.train_split} -> {n} {recipe.data.val_split} images; "
        f"patchnet rows from last.pt; mAP 11-point / envelope\n"
    )
    rows = [
        (_label(k, first), *(f"{100 * r[k].map07:.1f} / {100 * r[k].map:.1f}" for r in by_backbone.values()))
        for k in first
    ]
    rows.append(("minutes (features, fits and training)", *(f"{minutes[n]:.1f}" for n in by_backbone)))
    print(table(rows, ("method", *by_backbone)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backbones.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "limit": args.limit,
                "minutes": minutes,
                "backbones": {n: {k: v.to_dict() for k, v in r.items()} for n, r in by_backbone.items()},
            },
            indent=1,
        )
    )
    print(f"\nwrote {out / 'backbones.json'}")


def _label(row: str, results: dict) -> str:
    if row.endswith("_head"):
        return ROWS[row[:-5]] + ", the head alone (no fusion)"
    return ROWS[row] + (", fused with the max-pool SVM (infer.fuse)" if row + "_head" in results else "")


def _epoch_seconds(run_dir: Path) -> float:
    history = load_checkpoint(run_dir / "last.pt").history
    return sum(h["seconds"] for h in history) / max(len(history), 1)


if __name__ == "__main__":
    main()
