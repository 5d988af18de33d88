"""Training, evaluating and predicting: ``patchnet train``, ``eval``, ``predict`` and ``demo``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..datasets import DatasetError
from ..files import atomic_write, output_path
from ..recipe import load_recipe
from .common import DataOpt, PoolChoice, RecipeOpt, SetOpt, Skipped, app, log, session


@app.command()
def train(
    recipe: RecipeOpt,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Train anew over an earlier run of the same name.")] = False,
    verbose: bool = False,
):
    """Train the adaptation layers of a recipe; checkpoints go to <output>/<name>/."""
    with session(verbose):
        from ..model import CheckpointError
        from ..train import train as run

        r = load_recipe(recipe, overrides)
        if not resume and not overwrite and (r.run_dir / "last.pt").is_file():
            raise CheckpointError(
                f"{r.run_dir} already holds a run (last.pt); continue it with --resume, train anew "
                f"over it with --overwrite, or name this run otherwise with --set name=..."
            )
        result = run(r, resume=resume)
        typer.echo(f"run {result.run_dir}: {result.epochs} epochs in {result.seconds / 60:.1f} min")
        if result.table is not None:
            typer.echo(result.table.format())


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
        bool, typer.Option(help="Also play the pointing game with the score maps (needs boxes).")
    ] = False,
    prior: Annotated[
        float,
        typer.Option(
            help="Score maps (pointing game, localisation): pseudo-patches of the image mean in each pixel's mean "
            "(default: the recipe's infer.map_prior)."
        ),
    ] = -1.0,
    localize: Annotated[
        bool, typer.Option(help="Also score boxes (needs boxes): CorLoc and VOC detection AP at IoU 0.5.")
    ] = False,
    box_method: Annotated[
        str | None, typer.Option(help="Boxes: map (regions of the score map), patch or whole (baselines).")
    ] = None,
    box_threshold: Annotated[
        float | None,
        typer.Option(
            help="Boxes, map: where to cut, from the map's floor (0) to its peak (1) (default: infer.box_threshold)."
        ),
    ] = None,
    verbose: bool = False,
):
    """Score a split: per-class AP (VOC07 11-point and envelope), mAP, accuracy for single-label data; with
    --pointing and --localize, where the classes were found."""
    with session(verbose):
        from ..infer import evaluate_split

        table, n, (predictor, dataset, store, items, scores) = evaluate_split(
            checkpoint, data=data, split=split, fmt=fmt, mode=mode, pool=pool, k=k, fuse=fuse
        )
        typer.echo(table.format())
        typer.echo(
            f"{n} images; pooling {predictor.pool}"
            + (f", fused with the max-pool SVM (weight {predictor.fusion.weight_text()})" if predictor.fusion else "")
        )
        values = table.to_dict()
        if pointing:
            values["pointing"] = _pointing(predictor, dataset, store, items, prior)
        if localize:
            values["localization"] = _localization(
                predictor, dataset, store, items, scores, prior, box_method, box_threshold
            )
        write_table(table, out or checkpoint.parent, _eval_stem(split, pool, k, fuse), values)


def _eval_stem(split, pool, k, fuse) -> str:
    """eval_<split>[_<pool>][_k<k>][_nofuse]: one file per way of scoring, so none overwrites another."""
    return (
        f"eval_{split or 'val'}"
        + (f"_{pool}" if pool else "")
        + (f"_k{k:g}" if k is not None else "")
        + ("" if fuse else "_nofuse")
    )


def _pointing(predictor, dataset, store, items, prior) -> dict:
    """The pointing game on the split, printed; returns its rates for the JSON table."""
    from ..infer import pointing_game

    if not dataset.has_boxes:
        raise DatasetError(f"--pointing needs boxes, and {dataset.name} has none")
    prior = predictor.recipe.infer.map_prior if prior < 0 else prior
    result = pointing_game(predictor.head, store, dataset, items, predictor.pool, prior)
    typer.echo(result.format())
    return result.rates()


def _localization(predictor, dataset, store, items, scores, prior, method, threshold) -> dict:
    """CorLoc and detection AP of the split, printed; returns them for the JSON table."""
    from ..localize import box_options, evaluate_localization

    method, threshold = box_options(predictor.recipe.infer, method, threshold)
    if not dataset.has_boxes:
        raise DatasetError(f"--localize needs boxes, and {dataset.name} has none")
    result = evaluate_localization(
        predictor.head,
        store,
        dataset,
        items,
        scores,
        predictor.pool,
        method,
        threshold,
        predictor.recipe.infer.map_prior if prior < 0 else prior,
    )
    typer.echo(result.format())
    typer.echo(
        f"boxes: {method}"
        + (f", regions above {threshold:g} of the way from the map's floor to its peak" if method == "map" else "")
    )
    return {**result.to_dict(), "method": method, "threshold": threshold}


def write_table(table, out: Path, stem: str, values: dict | None = None) -> None:
    """An AP table as JSON (with any further ``values``) and CSV."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_path(out, stem, ".json"), output_path(out, stem, ".csv")
    atomic_write(json_path, json.dumps(values or table.to_dict(), indent=1))
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["class", "ap07", "ap"])
    for c, a, b in zip(table.classes, table.ap07, table.ap):
        w.writerow([c, f"{a:.6f}", f"{b:.6f}"])
    w.writerow(["mAP", f"{table.map07:.6f}", f"{table.map:.6f}"])
    atomic_write(csv_path, rows.getvalue())
    typer.echo(f"wrote {json_path} and {csv_path.name}")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c")],
    top: Annotated[int, typer.Option(help="Classes to print per image.")] = 3,
    pool: PoolChoice = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write all scores as JSON.")] = None,
    verbose: bool = False,
):
    """Print each image's top classes with calibrated probabilities; '*' marks a class judged present.

    Folders stand for the images in them. An image that cannot be read is skipped with a warning; the
    others are scored and written, and the exit code is then 1.
    """
    with session(verbose):
        from ..api import load
        from ..datasets import image_files

        model = load(checkpoint, pool=pool)
        if model.predictor.calibration is None:
            log.warning(
                "%s carries no calibration for pooling %s: printing raw pooled scores", checkpoint, model.predictor.pool
            )
        results = {}
        files = image_files(images)
        skipped = Skipped(len(files))
        for path in files:
            try:
                p = model.predict(path)
            except DatasetError as e:
                skipped.add(str(path), e)
                continue
            marks = p.present[0] if p.present is not None else np.zeros(len(model.classes), bool)
            best = ", ".join(f"{c}{'*' if marks[model.classes.index(c)] else ''} {v:.3f}" for c, v in p.top(top)[0])
            typer.echo(f"{path}: {best}")
            results[str(path)] = p.to_dict()[0]
        if model.predictor.calibration is not None:
            typer.echo(
                "(calibrated probabilities; * = above the class's decision threshold, both fitted on "
                "held-out training images)"
            )
        if json_out:
            atomic_write(
                json_out,
                json.dumps({"pool": model.predictor.pool, "images": results, "skipped": skipped.failed}, indent=1),
            )
            typer.echo(f"wrote {json_out}")
        skipped.finish()


DEMO_RECIPE = Path(__file__).resolve().parent.parent.parent / "recipes" / "demo.yaml"


@app.command()
def demo(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="The demo recipe.")] = DEMO_RECIPE,
    overrides: SetOpt = None,
    verbose: bool = False,
):
    """The embedded default: generate the demo set, train on it, evaluate on its test split."""
    with session(verbose):
        from ..infer import evaluate_split
        from ..train import train as run

        r = load_recipe(recipe, overrides)
        result = run(r)
        table, n, _ = evaluate_split(result.run_dir / "best.pt", split="test")
        typer.echo(table.format())
        typer.echo(
            f"demo: trained in {result.seconds:.0f} s; test mAP {100 * table.map07:.1f} (VOC07 11-point), "
            f"{100 * table.map:.1f} (envelope) on {n} images"
        )
