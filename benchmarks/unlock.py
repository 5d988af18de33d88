#!/usr/bin/env python
"""Unlocking the trunk's last stages (`train.unlock`): accuracy, epoch time and cache size against the head alone.

Each row trains the recipe (default `voc07_dev.yaml`: Lite2, shared mode, levels [1, 2, 3], supervision
`both`) on the first --limit devtrain images with `train.unlock` = N and scores `last.pt` on the first
--limit devval images: as the recipe scores (fused with the max-pool SVM when `infer.fuse`), and the
head alone through `patchnet eval --no-fuse`, which extracts devval with the trained trunk. N = 0 is the
head on cached patch features; N > 0 caches the maps below the unlocked stages and runs them every epoch.

    python benchmarks/unlock.py                                # N = 0, 1, 2 on 300 -> 300 images
    python benchmarks/unlock.py --limit 20 --set train.epochs=1  # a smoke test
"""

from __future__ import annotations

import json
from pathlib import Path

from patchnet.backbones import backbone_spec, unlock_split
from patchnet.checkpoint import load_checkpoint
from patchnet.data import open_split
from patchnet.evaluation.predictor import evaluate_split
from patchnet.evaluation.scoring import InferOptions
from patchnet.features.build import build_features, cache_spec
from patchnet.features.extract import build_extractor
from patchnet.store.codec import FeatureCodec
from patchnet.training.trainer import train
from patchnet.training.unlock import build_maps

from common import REPO, Timer, bench_parser, dev_recipe, machine, require_voc, table


def main() -> None:
    ap = bench_parser(__doc__, limit=300, limit_help="the first images of devtrain and of devval")
    ap.add_argument("--unlock", type=int, nargs="*", default=[0, 1, 2], help="values of train.unlock, one row each")
    ap.add_argument(
        "--out", default=str(REPO / "checkpoints" / "unlock"), help="folder for the runs, their cache and unlock.json"
    )
    args = ap.parse_args()
    voc = require_voc(args.voc)
    out = Path(args.out)
    rows, report = [], {}
    for n in args.unlock:
        recipe = dev_recipe(
            args,
            f"data.limit={args.limit}",
            f"runtime.output={out}",
            f"runtime.cache_dir={out / 'cache'}",
            f"name=unlock{n}",
            f"train.unlock={n}",
        )
        with Timer() as t:
            result = train(recipe)
        history = load_checkpoint(result.run_dir / "last.pt").history
        epoch = sum(h["seconds"] for h in history) / len(history)
        head = evaluate_split(result.run_dir / "last.pt", data=voc, options=InferOptions(fuse=False))[0]
        megabytes = _cache_megabytes_per_image(recipe)
        fused = "fused" if recipe.infer.fuse else "as scored"
        report[n] = {
            "map07": result.table.map07,
            "map": result.table.map,
            "head_map07": head.map07,
            "head_map": head.map,
            "epoch_seconds": epoch,
            "cache_mb_per_image": megabytes,
            "minutes": t.seconds / 60,
            "ap07": dict(zip(head.classes, result.table.ap07.tolist())),
        }
        rows.append(
            (
                n,
                _what(recipe.backbone.name, n),
                f"{100 * result.table.map07:.1f} / {100 * result.table.map:.1f}",
                f"{100 * head.map07:.1f} / {100 * head.map:.1f}",
                f"{epoch:.1f}",
                f"{megabytes:.2f}",
                f"{t.seconds / 60:.1f}",
            )
        )
        print(
            f"unlock {n}: mAP {100 * result.table.map07:.1f} ({fused}), {100 * head.map07:.1f} (head alone); "
            f"{epoch:.1f} s per epoch; {megabytes:.2f} MB per image",
            flush=True,
        )
    print(
        f"\nmachine: {machine()}; {args.recipe}: first {args.limit} devtrain -> first {args.limit} devval images; "
        "last.pt\n"
    )
    print(
        table(
            rows,
            (
                "unlock",
                "unlocked stages",
                f"mAP 11-pt / envelope ({fused})",
                "head alone",
                "s / epoch",
                "cache MB / image",
                "minutes",
            ),
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "unlock.json").write_text(json.dumps({"machine": machine(), "limit": args.limit, "rows": report}, indent=1))
    print(f"\nwrote {out / 'unlock.json'}")


def _what(backbone: str, n: int) -> str:
    if n == 0:
        return "none (cached patch features)"
    return ", ".join(s.name if s.name != "head" else "head conv" for s in backbone_spec(backbone).stages[-n:])


def _cache_megabytes_per_image(recipe) -> float:
    """Disk size of the training split's cache (warm: nothing is computed) per item."""
    dataset = open_split(recipe.data, recipe.data.train_split)
    extractor = build_extractor(recipe)
    if recipe.train.unlock:  # the maps are stored as they are, as train() stores them
        spec = cache_spec(recipe, extractor, dataset, codec=FeatureCodec(), progress=False)
        unlock = unlock_split(backbone_spec(recipe.backbone.name), recipe.train.unlock)
        store = build_maps(spec, dataset, extractor, unlock, views=recipe.aug.views, progress=False)
    else:
        spec = cache_spec(recipe, extractor, dataset, progress=False)
        store = build_features(spec, dataset, extractor, views=recipe.aug.views, progress=False)
    size = sum(f.stat().st_size for f in store.path.iterdir() if f.is_file())
    return size / 2**20 / max(len(store), 1)


if __name__ == "__main__":
    main()
