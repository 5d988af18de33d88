#!/usr/bin/env python
"""`patchnet train <folder>` as a new user runs it, on single-label folders built from ../shared/data, beside the
box-free baseline on the same cached features (patch features max-pooled per image, a linear SVM per class).

    python benchmarks/own_data.py --set pets          # images holding exactly one of cat, dog, bird, horse
    python benchmarks/own_data.py --set single20      # every image holding exactly one of the 20 VOC classes

The folder is an ImageFolder (``train/<class>/``, ``val/<class>/``; links to the VOC JPEGs): train from the
devtrain images, val from the devval images. ``--choose`` builds ``<class>/`` folders from devtrain alone,
so that the run's val split is the 10% of devtrain it holds out itself, and ``--fold K N`` makes the
K-th of N parts of devtrain the val split: settings are chosen there, never on the devval images
reported. Each ``--variant 'label|key=value|key=value'`` trains once more on the same
cache with those ``--set`` overrides. Prints top-1 accuracy, mean per-class accuracy and mAP (11-point)
of last.pt on val, and the wall time of each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, VOC, cpu_name, require_voc

SETS = {"pets": ["bird", "cat", "dog", "horse"], "single20": None}


def split_labels(voc: Path, split: str) -> dict[str, dict[str, int]]:
    """image id -> class -> label (1, -1, 0) from the per-class lists of a split."""
    from patchnet.recipe import VOC_CLASSES

    out: dict[str, dict[str, int]] = {}
    for c in VOC_CLASSES:
        for line in (voc / "ImageSets" / "Main" / f"{c}_{split}.txt").read_text().split("\n"):
            if line.strip():
                image, value = line.split()
                out.setdefault(image, {})[c] = int(value)
    return out


def build_folder(
    voc: Path, root: Path, classes: list[str] | None, choose: bool, fold: tuple[int, int] | None = None
) -> dict[str, int]:
    """Links to the images holding exactly one of ``classes`` (and no difficult-only one); returns counts.
    ``fold`` (k, n): devtrain alone, its k-th of n parts (by a hash of the image id) the val split."""
    from patchnet.recipe import VOC_CLASSES

    wanted = classes or VOC_CLASSES
    counts: dict[str, int] = {}
    for split, folder in (("devtrain", "train"), ("devval", "val")):
        if (choose or fold) and split == "devval":
            continue
        for image, labels in split_labels(voc, split).items():
            present = [c for c in wanted if labels[c] == 1]
            if len(present) != 1 or any(labels[c] == 0 for c in wanted):
                continue
            if fold is not None:
                folder = "val" if int(hashlib.sha1(image.encode()).hexdigest(), 16) % fold[1] == fold[0] else "train"
            target = root / ("." if choose else folder) / present[0] / f"{image}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(voc / "JPEGImages" / f"{image}.jpg", target)
            counts[folder] = counts.get(folder, 0) + 1
    return counts


def train_run(folder: Path, out: Path, name: str, cache: Path, sets: list[str]) -> tuple[dict, float]:
    """One `patchnet train FOLDER` in a subprocess, as a user runs it; its val table and wall time."""
    cmd = [sys.executable, "-m", "patchnet.cli", "train", str(folder), "--out", str(out), "--name", name]
    cmd += ["--overwrite", "--set", f"runtime.cache_dir={cache}"]
    for s in sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads((out / name / "eval_val.json").read_text()), seconds


def svm_baseline(run_dir: Path) -> tuple[dict, float]:
    """The max-pool linear SVM (C by 3-fold CV per class) on the run's cached features: trained on every
    training image (the head trained on 90% of them), scored on val."""
    from patchnet.data import open_split
    from patchnet.evaluation.metrics import accuracy, ap_table
    from patchnet.features.extract import build_extractor
    from patchnet.recipe import load_recipe
    from patchnet.studies.linear import fit_linear, split_features

    started = time.perf_counter()
    r = load_recipe(run_dir / "recipe.yaml")
    extractor = build_extractor(r)
    train = open_split(r.data, r.data.train_split)
    val = open_split(r.data, r.data.val_split, classes=train.classes)
    tf = split_features(r, train, extractor, "max", progress=False)
    vf = split_features(r, val, extractor, "max", progress=False)
    model = fit_linear(tf, seed=r.train.seed, progress=False)
    scores = model.decision(vf.features)
    top1, mean_class = accuracy(scores, vf.labels)
    table = ap_table(scores, vf.labels, vf.classes)
    return {"top1": top1, "mean_class_accuracy": mean_class, "map07": table.map07}, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="which", choices=list(SETS), default="pets")
    ap.add_argument("--choose", action="store_true", help="devtrain alone; val = the 10%% the run holds out")
    ap.add_argument("--fold", type=int, nargs=2, metavar=("K", "N"), help="devtrain alone; val = its K-th of N parts")
    ap.add_argument("--variant", action="append", default=[], help="'label|key=value|...': one more run")
    ap.add_argument("--out", type=Path, default=Path("/tmp/patchnet_own_data"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: OUT/cache")
    ap.add_argument("--voc", type=Path, default=VOC)
    args = ap.parse_args()
    voc = require_voc(args.voc)
    name = (
        args.which + ("_choose" if args.choose else "") + (f"_fold{args.fold[0]}of{args.fold[1]}" if args.fold else "")
    )
    folder = args.out / "data" / name
    counts = build_folder(voc, folder, SETS[args.which], args.choose, tuple(args.fold) if args.fold else None)
    cache = args.cache_dir or args.out / "cache"
    print(f"{name}: {counts} images (links into {voc}); CPU: {cpu_name()}", flush=True)
    rows = []
    for label, sets in [("default", []), *[(v.split("|")[0], v.split("|")[1:]) for v in args.variant]]:
        run_name = f"{name}_{label}"
        values, seconds = train_run(folder, args.out / "runs", run_name, cache, sets)
        rows.append((f"patchnet train ({label})", values, seconds))
        print(f"{rows[-1][0]}: {values.get('top1')} {values.get('map07')} in {seconds:.0f} s", flush=True)
    values, seconds = svm_baseline(args.out / "runs" / f"{name}_default")
    rows.append(("max-pool linear SVM, same features", values, seconds))
    print("\n| method | top-1 % | mean per-class acc % | mAP 11-pt | wall time |\n| --- | --- | --- | --- | --- |")
    for label, v, s in rows:
        print(
            f"| {label} | {100 * v['top1']:.1f} | {100 * v['mean_class_accuracy']:.1f} | {100 * v['map07']:.1f} "
            f"| {s:.0f} s{' (features cached)' if 'SVM' in label else ''} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
