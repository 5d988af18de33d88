"""Training, evaluating and predicting: ``patchnet train``, ``eval``, ``predict`` and ``demo``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, cast

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
            help="Pointing game: pseudo-patches of the image mean in each pixel's mean "
            "(default: the recipe's infer.map_prior)."
        ),
    ] = -1.0,
    verbose: bool = False,
):
    """Score a split: per-class AP (VOC07 11-point and envelope), mAP, accuracy for single-label data."""
    with session(verbose):
        from ..infer import evaluate_split, pointing_game

        table, n, (predictor, dataset, store, items) = evaluate_split(
            checkpoint, data=data, split=split, fmt=fmt, mode=mode, pool=pool, k=k, fuse=fuse
        )
        typer.echo(table.format())
        typer.echo(
            f"{n} images; pooling {predictor.pool}"
            + (f", fused with the max-pool SVM (weight {predictor.fusion.weight:g})" if predictor.fusion else "")
        )
        values = table.to_dict()
        if pointing:
            if not dataset.has_boxes:
                raise DatasetError(f"--pointing needs boxes, and {dataset.name} has none")
            result = pointing_game(
                predictor.head,
                store,
                dataset,
                items,
                predictor.pool,
                predictor.recipe.infer.map_prior if prior < 0 else prior,
            )
            typer.echo(result.format())
            values["pointing"] = result.rates()
        stem = (
            f"eval_{split or 'val'}"
            + (f"_{pool}" if pool else "")
            + (f"_k{k:g}" if k is not None else "")
            + ("" if fuse else "_nofuse")
        )
        write_table(table, out or checkpoint.parent, stem, values)


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
        from ..datasets import image_files
        from ..infer import Predictor

        predictor = Predictor(checkpoint, pool=pool)
        if predictor.calibration is None:
            log.warning(
                "%s carries no calibration for pooling %s: printing raw pooled scores", checkpoint, predictor.pool
            )
        results = {}
        files = image_files(images)
        skipped = Skipped(len(files))
        for path in files:
            try:
                p = predictor.predict(path)
            except DatasetError as e:
                skipped.add(str(path), e)
                continue
            shown = p.scores if p.probabilities is None else p.probabilities
            order = np.argsort(-shown)[:top]
            marks = p.present if p.present is not None else np.zeros(len(shown), bool)
            typer.echo(
                f"{path}: "
                + ", ".join(f"{predictor.classes[i]}{'*' if marks[i] else ''} {shown[i]:.3f}" for i in order)
            )
            results[str(path)] = {
                c: {
                    "score": float(p.scores[i]),
                    **(
                        {"probability": float(p.probabilities[i]), "present": bool(cast(np.ndarray, p.present)[i])}
                        if p.probabilities is not None
                        else {}
                    ),
                }
                for i, c in enumerate(predictor.classes)
            }
        if predictor.calibration is not None:
            typer.echo(
                "(calibrated probabilities; * = above the class's decision threshold, both fitted on "
                "held-out training images)"
            )
        if json_out:
            atomic_write(
                json_out, json.dumps({"pool": predictor.pool, "images": results, "skipped": skipped.failed}, indent=1)
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
