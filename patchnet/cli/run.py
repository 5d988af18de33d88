"""Training, evaluating and predicting: ``patchnet train``, ``eval``, ``predict`` and ``demo``."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..data import DatasetError
from ..files import atomic_write, json_text, output_path, printable
from ..recipe import PILLOW_LIMIT, load_recipe
from .common import (
    BoxMethodOpt,
    BoxThresholdOpt,
    CheckpointOpt,
    DataArg,
    DataFormatOpt,
    DataOpt,
    DeviceOpt,
    PoolChoice,
    SetOpt,
    Skipped,
    VerboseOpt,
    app,
    check_device,
    log,
    resolve_checkpoint,
    session,
    table_folder,
)


@app.command()
def train(
    data: DataArg = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", "-r", help="Recipe YAML (see recipes/). Default: the default recipe.", show_default=False
        ),
    ] = None,
    overrides: SetOpt = None,
    fmt: DataFormatOpt = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Run name: its folder is <out>/<name>/. Default: DATA's folder name, or the recipe's.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs of the head. Default: the recipe's (12).", show_default=False)
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Frozen trunk, e.g. efficientnet_lite0, resnet50 (docs/usage.md). Default: efficientnet_lite2.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder the run's folder goes in. Default: checkpoints.", show_default=False)
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last.pt.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Train anew over an earlier run of the same name.")
    ] = False,
    verbose: VerboseOpt = False,
):
    """Train on a folder of your images (patchnet train photos/) or as a recipe says; the run goes to <out>/<name>/."""
    with session(verbose):
        from ..dist import resolve_device
        from ..training.setup import RunOptions, check_new_run, layout_table, open_run_splits, run_recipe
        from ..training.trainer import train as run

        options = RunOptions(name, epochs, backbone, device, None if out is None else str(out))
        r, layout = run_recipe(data, recipe, overrides, options, fmt)
        check_new_run(r, resume, overwrite)
        splits = open_run_splits(r) if data is not None else {}
        if splits:
            typer.echo(layout_table(r, layout, splits, str(resolve_device(r.runtime.device))))
        result = run(r, resume=resume, datasets=splits, overwrite=overwrite)
        report_run(r, result)


def report_run(recipe, result) -> None:
    """What a run made and where: the val split's figures (a confusion matrix for single-label data), the
    files, and the command that tries the model."""
    from ..outputs.draw import draw_confusion

    d = result.run_dir
    typer.echo(f"\nrun {d}: {result.epochs} epochs in {result.seconds / 60:.1f} min")
    if result.table is not None:
        t, split = result.table, recipe.data.val_split
        typer.echo(result.table.format())
        if t.top1 is not None:
            typer.echo(
                f"{split}: top-1 accuracy {100 * t.top1:.1f}%, mean per-class accuracy "
                f"{100 * t.mean_class_accuracy:.1f}%, mAP {100 * t.map07:.1f} (last.pt)"
            )
        else:
            typer.echo(f"{split}: mAP {100 * t.map07:.1f} (VOC07 11-point), {100 * t.map:.1f} (envelope) (last.pt)")
        write_table(t, d, f"eval_{split}")
        if result.confusion is not None:
            path = draw_confusion(result.confusion, t.classes, d / f"confusion_{split}.png", f"last.pt on {split}")
            typer.echo(f"wrote {path}")
    best = d / "best.pt"
    typer.echo(f"models: {best if best.is_file() else ''} {d / 'last.pt'}; recipe: {d / 'recipe.yaml'}")
    typer.echo(f"training curves: tensorboard --logdir {d / 'tensorboard'}")
    typer.echo(
        f"try it: patchnet predict --checkpoint {best if best.is_file() else d / 'last.pt'} IMAGES --out predictions/"
    )


PriorOpt = Annotated[
    float | None,
    typer.Option(
        help="Score maps (pointing game, localisation): pseudo-patches of the image mean in each pixel's mean "
        "(default: the recipe's infer.map_prior).",
    ),
]


CacheDirOpt = Annotated[
    Path | None,
    typer.Option(help="Folder of the feature cache (default: the recipe's runtime.cache_dir).", show_default=False),
]


@app.command()
def eval(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A best.pt or last.pt.")],
    data: DataOpt = None,
    split: Annotated[str | None, typer.Option(help="Split to score (default: the recipe's val split).")] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="voc, coco, demo, folder or csv (default: the recipe's).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the AP table as JSON and CSV.")] = None,
    mode: Annotated[str | None, typer.Option(help="Patch features: exact or shared (default: as trained).")] = None,
    pool: PoolChoice = None,
    k: Annotated[float | None, typer.Option(help="Power of the power-k mean (default: the recipe's pool.k).")] = None,
    fuse: Annotated[
        bool, typer.Option(help="Add the checkpoint's fused max-pool classifier (infer.fuse), if any.")
    ] = True,
    pointing: Annotated[
        bool, typer.Option("--pointing", help="Also play the pointing game with the score maps (needs boxes).")
    ] = False,
    prior: PriorOpt = None,
    localize: Annotated[
        bool,
        typer.Option("--localize", help="Also score boxes (needs boxes): CorLoc and VOC detection AP at IoU 0.5."),
    ] = False,
    box_method: BoxMethodOpt = None,
    box_threshold: BoxThresholdOpt = None,
    device: DeviceOpt = None,
    cache_dir: CacheDirOpt = None,
    verbose: VerboseOpt = False,
):
    """Score a split: per-class AP (VOC07 11-point and envelope), mAP, accuracy for single-label data; with
    --pointing and --localize, where the classes were found (read from the split's boxes, also for a model
    trained without them)."""
    with session(verbose):
        from ..evaluation.predictor import evaluate_split
        from ..evaluation.scoring import InferOptions

        check_device(device)
        options = InferOptions(device=device, mode=mode, pool=pool, k=k, fuse=fuse, map_prior=prior)
        # --pointing and --localize read the split's boxes, also where the model was trained without them
        table, n, (predictor, dataset, store, items, scores) = evaluate_split(
            checkpoint, data, split, fmt, options, boxes=pointing or localize, cache_dir=cache_dir
        )
        typer.echo(table.format())
        typer.echo(
            f"{n} images; pooling {predictor.pool}"
            + (f", fused with the max-pool SVM (weight {predictor.fusion.weight_text()})" if predictor.fusion else "")
        )
        values = table.to_dict()
        if pointing:
            values["pointing"] = _pointing(predictor, dataset, store, items)
        if localize:
            values["localization"] = _localization(predictor, dataset, store, items, scores, box_method, box_threshold)
        write_table(table, out or table_folder(checkpoint), _eval_stem(split, pool, k, fuse), values)


def _eval_stem(split, pool, k, fuse) -> str:
    """eval_<split>[_<pool>][_k<k>][_nofuse]: one file per way of scoring, so none overwrites another."""
    return (
        f"eval_{split or 'val'}"
        + (f"_{pool}" if pool else "")
        + (f"_k{k:g}" if k is not None else "")
        + ("" if fuse else "_nofuse")
    )


def _pointing(predictor, dataset, store, items) -> dict:
    """The pointing game on the split, printed; returns its rates for the JSON table."""
    from ..evaluation.maps import pointing_game

    if not dataset.has_boxes:
        raise DatasetError(f"--pointing needs boxes, and {dataset.name} has none")
    result = pointing_game(predictor.head, store, dataset, items, predictor.pool, predictor.map_prior())
    typer.echo(result.format())
    return result.rates()


def _localization(predictor, dataset, store, items, scores, method, threshold) -> dict:
    """CorLoc and detection AP of the split, printed; returns them for the JSON table."""
    from ..evaluation.localize import box_options, evaluate_localization

    method, threshold = box_options(predictor.recipe.infer, method, threshold, predictor.detector is not None)
    if not dataset.has_boxes:
        raise DatasetError(f"--localize needs boxes, and {dataset.name} has none")
    if method == "mil":
        return _detector_localization(predictor, dataset)
    result = evaluate_localization(
        predictor.head,
        store,
        dataset,
        items,
        scores,
        predictor.pool,
        method,
        threshold,
        predictor.map_prior(),
    )
    typer.echo(result.format())
    typer.echo(
        f"boxes: {method}"
        + (f", regions above {threshold:g} of the way from the map's floor to its peak" if method == "map" else "")
    )
    return {**result.to_dict(), "method": method, "threshold": threshold}


def _detector_localization(predictor, dataset) -> dict:
    """CorLoc and detection AP from the detection head, on the split's cached trunk maps; printed with the AP of
    its WSDDN image scores as a classifier. Returns them for the JSON table."""
    from ..evaluation.localize import evaluate_detector
    from ..evaluation.metrics import ap_table
    from ..features.build import cache_spec
    from ..store.codec import FeatureCodec
    from ..training.unlock import build_maps

    ex = predictor.extractor
    store = build_maps(cache_spec(predictor.recipe, ex, codec=FeatureCodec()), dataset, ex, None)
    items = np.flatnonzero((store.view == 0) & store.ok)
    result, image_scores = evaluate_detector(
        predictor.detector, store, dataset, items, predictor.recipe.detector, predictor.geometry, ex.autocast_dtype
    )
    typer.echo(result.format())
    table = ap_table(image_scores, dataset.labels()[store.record[items]], list(dataset.classes))
    typer.echo(
        f"boxes: mil (the detection head); its WSDDN image scores as a classifier: mAP {100 * table.map07:.1f} "
        f"(VOC07 11-point), {100 * table.map:.1f} (envelope)"
    )
    return {**result.to_dict(), "method": "mil", "wsddn_map07": table.map07, "wsddn_map": table.map}


def write_table(table, out: Path, stem: str, values: dict | None = None) -> None:
    """An AP table as JSON (with any further ``values``) and CSV."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_path(out, stem, ".json"), output_path(out, stem, ".csv")
    atomic_write(json_path, json_text(values or table.to_dict(), indent=1))
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["class", "ap07", "ap"])
    for c, a, b in zip(table.classes, table.ap07, table.ap):
        w.writerow([c, f"{a:.6f}", f"{b:.6f}"])
    w.writerow(["mAP", f"{table.map07:.6f}", f"{table.map:.6f}"])
    atomic_write(csv_path, rows.getvalue())
    typer.echo(f"wrote {json_path} and {csv_path.name}")


PredictOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Folder for the results: per image <name>.jpg (its top classes and probabilities drawn in a corner, "
        "classes judged present ticked) and heatmaps/<name>_<class>.png (where each class judged present was "
        "found, or the best class where none is); predictions.csv, one row per image and class, best first "
        "(file, rank, class, probability, score, present, annotated, heatmap: filter present or rank in a "
        "spreadsheet); predictions.json, the same keyed by the image's path.",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help="Judge a class present where its calibrated probability reaches this (default: the checkpoint's "
        "own per-class thresholds, fitted on held-out training images)."
    ),
]


MaxPixelsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=PILLOW_LIMIT,
        help="Refuse images of more pixels, before decoding them (default: the recipe's data.max_pixels, 50 M).",
        show_default=False,
    ),
]


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (a folder stands for its images).")],
    checkpoint: CheckpointOpt = None,
    out: PredictOutOpt = None,
    top: Annotated[
        int, typer.Option(min=1, help="Classes printed and drawn per image (classes judged present are drawn too).")
    ] = 3,
    threshold: ThresholdOpt = None,
    device: DeviceOpt = None,
    pool: PoolChoice = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write all scores as JSON to this file (as predictions.json).")
    ] = None,
    max_pixels: MaxPixelsOpt = None,
    verbose: VerboseOpt = False,
):
    """Print each image's top classes with calibrated probabilities ('*' marks a class judged present); with
    --out, also write annotated copies, heatmaps, predictions.csv and predictions.json.

    Folders stand for the images in them. An image that cannot be read is skipped with a warning; the
    others are scored and written, and the exit code is then 1.
    """
    with session(verbose):
        from ..api import load
        from ..evaluation.scoring import InferOptions
        from ..outputs.results import PredictionFolder

        path = resolve_checkpoint(checkpoint)
        model = load(path, options=InferOptions(device=device or "auto", pool=pool))  # auto: a GPU where there is one
        if max_pixels is not None:
            model.recipe.data = replace(model.recipe.data, max_pixels=max_pixels)
        if model.predictor.calibration is None:
            log.warning(
                "%s carries no calibration for pooling %s: printing raw pooled scores", path, model.predictor.pool
            )
        model.check_threshold(threshold)  # once, before any image
        files = _image_files(images)
        skipped = Skipped(len(files))
        folder = PredictionFolder(out, model.classes, top) if out is not None else None
        results = _predict_each(model, files, folder, threshold, top, skipped)
        if model.predictor.calibration is not None:
            rule = f"at or above {threshold:g}" if threshold is not None else "above the class's decision threshold"
            typer.echo(f"(calibrated probabilities; * = {rule}, fitted on held-out training images)")
        document = {
            "checkpoint": str(path),
            "pool": model.predictor.pool,
            "threshold": threshold,  # null: the checkpoint's per-class thresholds
            "images": results,
            "skipped": skipped.failed,
        }
        if json_out:
            atomic_write(json_out, json_text(document, indent=1))
            typer.echo(f"wrote {json_out}")
        if folder is not None:
            folder.finish(document)
            typer.echo(folder.summary())
        skipped.finish()


def _image_files(images: list[Path]) -> list[Path]:
    """The image files given and those in the folders given; none at all is an error."""
    from ..data import IMAGE_SUFFIXES, image_files

    files = image_files(images)
    if not files:
        raise DatasetError(
            f"no images in {', '.join(map(str, images))}; give image files, or folders that hold "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files"
        )
    return files


def _predict_each(model, files: list[Path], folder, threshold: float | None, top: int, skipped: Skipped) -> dict:
    """Score the images one by one, printing a line each (and writing their files into ``folder``, if any);
    returns path -> class -> score, probability, present."""
    from tqdm.auto import tqdm

    from ..outputs.results import input_names

    results = {}
    # a bar where there are more than a few images; the per-image lines print above it
    jobs = list(zip(files, input_names(files)))
    for file, name in tqdm(jobs, desc="predict", unit="img", disable=len(files) <= 3, leave=False):
        try:
            explained = model.explain(file, threshold=threshold) if folder is not None else None
            p = model.predict(file, threshold=threshold) if explained is None else explained.predictions
        except DatasetError as e:
            skipped.add(str(file), e)
            continue
        if explained is not None:
            folder.add(file, name, explained)
        marks = p.present[0] if p.present is not None else np.zeros(len(model.classes), bool)
        best = ", ".join(f"{c}{'*' if marks[model.classes.index(c)] else ''} {v:.3f}" for c, v in p.top(top)[0])
        tqdm.write(printable(f"{file}: {best}"))
        results[str(file)] = p.to_dict()[0]
    return results


DEMO_RECIPE = Path(__file__).resolve().parent.parent.parent / "recipes" / "demo.yaml"


@app.command()
def demo(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="The demo recipe.")] = DEMO_RECIPE,
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
):
    """The embedded default: generate the demo set, train on it, evaluate on its test split."""
    with session(verbose):
        from ..evaluation.predictor import evaluate_split
        from ..evaluation.scoring import InferOptions
        from ..training.trainer import train as run

        r = load_recipe(recipe, overrides)
        if device:
            r.runtime.device = device
        result = run(r)
        table, n, _ = evaluate_split(result.run_dir / "best.pt", split="test", options=InferOptions(device=device))
        typer.echo(table.format())
        typer.echo(
            f"demo: trained in {result.seconds:.0f} s; test mAP {100 * table.map07:.1f} (VOC07 11-point), "
            f"{100 * table.map:.1f} (envelope) on {n} images"
        )
