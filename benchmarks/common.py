"""Shared set-up of the benchmarks: the real VOC2007 images in ../shared/data, the command line, timing, tables."""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from patchnet.dist import native_bf16

if TYPE_CHECKING:
    from patchnet.data import Dataset
    from patchnet.evaluation.predictor import Predictor
    from patchnet.store import FeatureStore
    from patchnet.training.splits import Selection, SplitData

REPO = Path(__file__).resolve().parent.parent
VOC = REPO.parent / "shared" / "data" / "VOCdevkit" / "VOC2007"
DEV_RECIPE = REPO / "recipes" / "voc07_dev.yaml"


def int8_weight_bits_option(ap: argparse.ArgumentParser) -> None:
    """``--int8-weight-bits``: int8 trunks quantise their weights to 7 or 8 bits whatever this CPU has."""
    ap.add_argument(
        "--int8-weight-bits",
        type=int,
        choices=[7, 8],
        help="backbone.precision=int8: the weights' bits whatever this CPU has (7: as a CPU without VNNI gets them)",
    )


def force_int8_weight_bits(bits: int | None) -> None:
    if bits:
        from patchnet.backbones import quantize

        quantize.weight_bits = lambda: bits


def require_voc(root: Path | str = VOC) -> Path:
    root = Path(root)
    if not (root / "ImageSets" / "Main" / "devval.txt").is_file():
        raise SystemExit(
            f"benchmark data not found at {root}: the benchmarks run on the VOC2007 images of "
            "../shared/data (pass --voc /path/to/VOCdevkit/VOC2007)"
        )
    return root


def bench_parser(
    doc: str | None,
    *,
    voc: bool = True,
    recipe: Path | str | None = DEV_RECIPE,
    sets: bool = True,
    limit: int | None = None,
    limit_help: str = "first N images of each split (0: all)",
) -> argparse.ArgumentParser:
    """The command line every benchmark starts with; its description is the module docstring ``doc``.

    - ``--voc``: the VOC2007 root (default ../shared/data/VOCdevkit/VOC2007); left out with ``voc=False``;
    - ``--recipe``: the recipe, by default ``recipe`` (the dev recipe); left out with ``recipe=None``;
    - ``--set``: extra recipe overrides, applied after the benchmark's own; left out with ``sets=False``;
    - ``--limit``, only when ``limit`` is given (its default): the first N images of the splits.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if voc:
        ap.add_argument("--voc", default=str(VOC), help="the VOC2007 root with the devtrain and devval lists")
    if recipe is not None:
        ap.add_argument("--recipe", default=str(recipe), help="the recipe (default: %(default)s)")
    if sets:
        ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides (section.field=value)")
    if limit is not None:
        ap.add_argument("--limit", type=int, default=limit, help=limit_help)
    return ap


def dev_recipe(args: argparse.Namespace, *overrides: str, after: tuple[str, ...] | list[str] = ()):
    """``args.recipe`` with data.root set to ``args.voc``, then ``overrides``, the --set overrides of
    ``args.set`` and last ``after`` (the benchmark's settings that --set must not change)."""
    from patchnet.recipe import load_recipe

    return load_recipe(args.recipe, [f"data.root={require_voc(args.voc)}", *overrides, *args.set, *after])


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 (timings differ about 2x between the two kinds)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({'native bf16' if native_bf16() else 'no native bf16: fp32 trunk'})"


def machine() -> str:
    threads = torch.get_num_threads()
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {threads} torch threads, {gpu}, torch {torch.__version__}"


class Timer:
    """Wall seconds of a block; CUDA work queued inside it is waited for at both ends."""

    def __enter__(self):
        _sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync()
        self.seconds = time.perf_counter() - self.start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def table(rows: list[tuple], headers: tuple) -> str:
    """A Markdown table."""
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in r) for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"
    return "\n".join([fmt(cells[0]), "| " + " | ".join("-" * w for w in width) + " |"] + [fmt(r) for r in cells[1:]])


@dataclass
class RunScores:
    """A trained run's scores as training saw them: the held-out training images (selection) and the validation
    split, each with its head scores, max-pooled trunk features and labels, and the max-pool SVM fitted as
    training fits it (on the other training images)."""

    predictor: Predictor
    train_data: SplitData
    selection: Selection
    coef: np.ndarray
    intercept: np.ndarray
    sel_scores: np.ndarray
    sel_pooled: np.ndarray
    sel_labels: np.ndarray
    val: Dataset
    store: FeatureStore  # the validation split's
    items: np.ndarray
    val_scores: np.ndarray
    val_pooled: np.ndarray
    val_labels: np.ndarray


def run_splits(predictor: Predictor, cache_dir: str):
    """The held-out training images (the selection) and the validation split of ``predictor``'s run, its
    features from the cache the run was trained from: (train data, selection, val dataset, val store, val items)."""
    from patchnet.data import open_split
    from patchnet.evaluation.scoring import evaluation_items
    from patchnet.features.build import build_features, cache_spec
    from patchnet.training.splits import prepare_split, selection_split

    recipe, extractor = predictor.recipe, predictor.extractor
    recipe.runtime.cache_dir = cache_dir
    spec = cache_spec(recipe, extractor, codec=predictor.codec)
    train_data = prepare_split(recipe, recipe.data.train_split, extractor, spec, views=recipe.aug.views)
    selection = selection_split(recipe, train_data, extractor, spec)
    if selection is None:
        raise SystemExit(f"{recipe.name}: its run held out no training images (train.holdout=0)")
    val = open_split(recipe.data, recipe.data.val_split, classes=predictor.classes)
    store = build_features(spec, val, extractor)
    return train_data, selection, val, store, evaluation_items(store)


def run_scores(checkpoint: str, cache_dir: str) -> RunScores:
    """``checkpoint``'s scores from the cache its run was trained from."""
    from patchnet.evaluation.predictor import Predictor
    from patchnet.evaluation.scoring import InferOptions, image_scores
    from patchnet.head.pooling import pool_features
    from patchnet.training.hooks import SelectionEval

    predictor = Predictor(checkpoint, InferOptions(fuse=False))
    recipe, pool = predictor.recipe, predictor.pool
    train_data, selection, val, store, items = run_splits(predictor, cache_dir)
    coef, intercept, sel_pooled = SelectionEval(recipe, train_data, selection).fit_svm()
    sel_scores = image_scores(predictor.head, selection.data.store, selection.items, recipe.pool, pool)
    return RunScores(
        predictor,
        train_data,
        selection,
        coef,
        intercept,
        sel_scores,
        sel_pooled,
        selection.labels(),
        val,
        store,
        items,
        image_scores(predictor.head, store, items, recipe.pool, pool),
        pool_features(store.trunk_rows, store.offsets, items, "max"),
        val.labels()[store.record[items]],
    )


def fused_tables(run: RunScores, sel_scores: np.ndarray, sel_pooled: np.ndarray, val_scores, val_pooled):
    """The fusion refitted on the held-out rows as training fits it, and the 11-point / envelope tables of the
    held-out images (head alone, fused) and the validation split (head alone, fused, the SVM alone)."""
    from patchnet.evaluation.metrics import ap_table
    from patchnet.head.fusion import fit_fusion

    p, labels = run.predictor, run.sel_labels
    names = [str(i) for i in range(labels.shape[1])]
    fusion, _ = fit_fusion(p.pool, run.coef, run.intercept, sel_scores, sel_pooled, labels)
    val_decisions = fusion.decision(val_pooled)
    return fusion, (
        ap_table(sel_scores, labels, names),
        ap_table(fusion.combine(sel_scores, fusion.decision(sel_pooled)), labels, names),
        ap_table(val_scores, run.val_labels, p.classes),
        ap_table(fusion.combine(val_scores, val_decisions), run.val_labels, p.classes),
        ap_table(val_decisions, run.val_labels, p.classes),
    )


def box_sheet(drawn: list[tuple[np.ndarray, list]], classes: list[str], out: Path, cols: int = 4) -> None:
    """Images with their boxes (``patchnet.outputs.draw.draw_detections``), each fitted into 400 x 300, tiled
    ``cols`` to a row into one JPEG at ``out``."""
    from PIL import Image

    from patchnet.outputs.draw import draw_detections

    tiles = []
    for n, (image, found) in enumerate(drawn):
        path = out.parent / f".tile{n}.png"
        draw_detections(image, found, classes, path)
        tile = Image.open(path).convert("RGB")
        tile.thumbnail((400, 300))  # keeps the aspect ratio
        tiles.append(tile)
        path.unlink()
    sheet = Image.new("RGB", (400 * cols, 300 * ((len(tiles) + cols - 1) // cols)), "white")
    for n, tile in enumerate(tiles):
        x, y = 400 * (n % cols) + (400 - tile.width) // 2, 300 * (n // cols) + (300 - tile.height) // 2
        sheet.paste(tile, (x, y))
    sheet.save(out, quality=85)
    print(f"wrote {out}")
