"""The ``patchnet`` command line: parses, then calls the modules that do the work."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .datasets import DatasetError
from .errors import PatchnetError
from .files import atomic_write, output_path
from .recipe import RecipeError, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-scale patch-based transfer learning on a frozen ImageNet CNN.")
log = logging.getLogger("patchnet")



@contextmanager
def session(verbose: bool = False):
    """Log through tqdm, and turn errors about the user's input into one line and exit code 2."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("patchnet").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        with logging_redirect_tqdm():
            yield
    except PatchnetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # a path the user gave that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{e.strerror or e}; check the path and its permissions", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


class Skipped:
    """Inputs that could not be read: each is warned about as it happens, and the rest goes on; ``finish``
    then says how many failed and exits with code 1 (the outputs of the others are written first)."""

    def __init__(self, total: int, what: str = "images"):
        self.total, self.what, self.failed = total, what, {}

    def add(self, name: str, error: Exception | str) -> None:
        log.warning("skipped %s", error if str(name) in str(error) else f"{name}: {error}")
        self.failed[str(name)] = str(error)

    def finish(self) -> None:
        if self.failed:
            typer.echo(f"{len(self.failed)} of {self.total} {self.what} could not be read and were skipped "
                       f"(listed above)", err=True)
            raise typer.Exit(1)


RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a field: section.field=value.")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset root: VOCdevkit/VOC20xx, a COCO folder, "
                                                                  "an image folder or a folder of <split>.csv lists.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Dataset format: voc, coco, demo, folder or csv.")]
PoolChoice = Annotated[Optional[str], typer.Option(
    "--pool", help="Pooling of patch scores: power, max, lse or topk (default: the model's own).")]


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
        from .model import CheckpointError
        from .train import train as run

        r = load_recipe(recipe, overrides)
        if not resume and not overwrite and (r.run_dir / "last.pt").is_file():
            raise CheckpointError(f"{r.run_dir} already holds a run (last.pt); continue it with --resume, train anew "
                                  f"over it with --overwrite, or name this run otherwise with --set name=...")
        result = run(r, resume=resume)
        typer.echo(f"run {result.run_dir}: {result.epochs} epochs in {result.seconds / 60:.1f} min")
        if result.table is not None:
            typer.echo(result.table.format())


@app.command()
def eval(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A best.pt or last.pt.")],
    data: DataOpt = None,
    split: Annotated[Optional[str], typer.Option(help="Split to score (default: the recipe's val split).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="voc, coco, demo, folder or csv (default: the recipe's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the AP table as JSON and CSV.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="Patch features: exact or shared (default: as trained).")] = None,
    pool: PoolChoice = None,
    k: Annotated[Optional[float], typer.Option(help="Power of the power-k mean (default: the recipe's pool.k).")] = None,
    fuse: Annotated[bool, typer.Option(help="Add the checkpoint's fused max-pool classifier (infer.fuse), if any.")] = True,
    pointing: Annotated[bool, typer.Option(help="Also play the pointing game with the score maps (needs boxes).")] = False,
    prior: Annotated[float, typer.Option(help="Pointing game: pseudo-patches of the image mean in each pixel's mean "
                                              "(default: the recipe's infer.map_prior).")] = -1.0,
    verbose: bool = False,
):
    """Score a split: per-class AP (VOC07 11-point and envelope), mAP, accuracy for single-label data."""
    with session(verbose):
        from .infer import evaluate_split, pointing_game

        table, n, (predictor, dataset, store, items) = evaluate_split(checkpoint, data=data, split=split, fmt=fmt,
                                                                      mode=mode, pool=pool, k=k, fuse=fuse)
        typer.echo(table.format())
        typer.echo(f"{n} images; pooling {predictor.pool}" + (f", fused with the max-pool SVM (weight "
                                                              f"{predictor.fusion.weight:g})" if predictor.fusion else ""))
        values = table.to_dict()
        if pointing:
            if not dataset.has_boxes:
                raise DatasetError(f"--pointing needs boxes, and {dataset.name} has none")
            result = pointing_game(predictor.head, store, dataset, items, predictor.pool,
                                   predictor.recipe.infer.map_prior if prior < 0 else prior)
            typer.echo(result.format())
            values["pointing"] = result.rates()
        stem = (f"eval_{split or 'val'}" + (f"_{pool}" if pool else "") + (f"_k{k:g}" if k is not None else "")
                + ("" if fuse else "_nofuse"))
        _write_table(table, out or checkpoint.parent, stem, values)


def _write_table(table, out: Path, stem: str, values: dict | None = None) -> None:
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
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write all scores as JSON.")] = None,
    verbose: bool = False,
):
    """Print each image's top classes with calibrated probabilities; '*' marks a class judged present.

    Folders stand for the images in them. An image that cannot be read is skipped with a warning; the
    others are scored and written, and the exit code is then 1.
    """
    with session(verbose):
        from .datasets import image_files
        from .infer import Predictor

        predictor = Predictor(checkpoint, pool=pool)
        if predictor.calibration is None:
            log.warning("%s carries no calibration for pooling %s: printing raw pooled scores", checkpoint,
                        predictor.pool)
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
            typer.echo(f"{path}: " + ", ".join(f"{predictor.classes[i]}{'*' if marks[i] else ''} {shown[i]:.3f}"
                                               for i in order))
            results[str(path)] = {c: {"score": float(p.scores[i]),
                                      **({"probability": float(p.probabilities[i]), "present": bool(p.present[i])}
                                         if p.probabilities is not None else {})}
                                  for i, c in enumerate(predictor.classes)}
        if predictor.calibration is not None:
            typer.echo("(calibrated probabilities; * = above the class's decision threshold, both fitted on "
                       "held-out training images)")
        if json_out:
            atomic_write(json_out, json.dumps({"pool": predictor.pool, "images": results,
                                               "skipped": skipped.failed}, indent=1))
            typer.echo(f"wrote {json_out}")
        skipped.finish()


@app.command()
def inspect(
    data: Annotated[Path, typer.Option("--data", help="Dataset root (VOC layout, COCO folder, image folder, CSV folder).")],
    split: Annotated[str, typer.Option(help="Split name.")] = "trainval",
    fmt: FormatOpt = "voc",
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe for patch settings and classes.")] = None,
    overrides: SetOpt = None,
    image: Annotated[Optional[str], typer.Option(help="Image id to draw (default: the first with objects).")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("inspect.png"),
    verbose: bool = False,
):
    """Print label statistics of a split and draw one image's patches coloured by training label."""
    with session(verbose):
        from .datasets import data_override, image_label_statistics, open_split
        from .draw import draw_labels
        from .recipe import recipe_from_dict
        from .sampler import split_statistics

        r = load_recipe(recipe, overrides) if recipe else recipe_from_dict({}, overrides)
        cfg = data_override(r.data, data, fmt)
        if cfg.format in ("coco", "folder", "csv") and recipe is None:
            cfg.classes = []  # the classes found in the data
        dataset = open_split(cfg, split)
        typer.echo(image_label_statistics(dataset))
        if not dataset.has_boxes:
            typer.echo("no boxes: train with --set train.supervision=images (no patch labels to draw)")
            return
        stats = split_statistics(dataset, r.patches)
        typer.echo(stats.format())
        target = _pick_image(dataset, image)
        draw_labels(target, dataset.classes, r.patches, out)
        typer.echo(f"wrote {out} (image {target.image_id})")


def _pick_image(dataset, image_id: str | None):
    if image_id is None:  # an instructive one: several classes of medium-sized objects
        def interest(r):
            area = (r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1]) / (r.width * r.height)
            medium = (area > 0.02) & (area < 0.3) & ~r.box_difficult
            return len(set(r.box_classes[medium].tolist())), int(medium.sum())

        return max(dataset.records[:300], key=interest)
    for r in dataset.records:
        if r.image_id == image_id:
            return r
    raise DatasetError(f"image {image_id!r} is not in {dataset.name}")


PoolOpt = Annotated[str, typer.Option(help="whole: one pass on the image and its mirror, averaged; "
                                            "mean/max: over the recipe's multi-scale patch grid.")]


def _pooled_recipe(recipe_path: Path, overrides, pool: str):
    from .linear import whole_image_recipe

    r = load_recipe(recipe_path, overrides)
    if pool not in ("whole", "mean", "max"):
        raise RecipeError(f"--pool must be whole, mean or max; got {pool!r}")
    return (whole_image_recipe(r) if pool == "whole" else r), ("mean" if pool == "whole" else pool)


@app.command()
def features(
    recipe: RecipeOpt,
    split: Annotated[str, typer.Option(help="Split of the recipe's dataset.")],
    out: Annotated[Path, typer.Option(help="Output .npz: ids, features, labels, classes.")],
    pool: PoolOpt = "whole",
    overrides: SetOpt = None,
    verbose: bool = False,
):
    """Extract one feature per image of a split (FC6/FC7 of alexnet/vgg16: --set backbone.layer=fc6)."""
    with session(verbose):
        from .datasets import open_split
        from .linear import split_features
        from .extract import build_extractor

        r, reduce = _pooled_recipe(recipe, overrides, pool)
        f = split_features(r, open_split(r.data, split), build_extractor(r), reduce)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda fh: np.savez(fh, ids=np.array(f.ids), features=f.features, labels=f.labels,
                                              classes=np.array(f.classes)))
        typer.echo(f"wrote {out}: {f.features.shape[0]} images x {f.features.shape[1]} features")


@app.command()
def linear(
    recipe: RecipeOpt,
    train_split: Annotated[Optional[str], typer.Option("--train", help="Training split (default: the recipe's).")] = None,
    eval_split: Annotated[Optional[str], typer.Option("--eval", help="Scored split (default: the recipe's val).")] = None,
    method: Annotated[str, typer.Option(help="svm (linear SVM) or logreg (logistic regression).")] = "svm",
    pool: PoolOpt = "whole",
    views: Annotated[int, typer.Option(help="Augmented views per training image (the recipe's aug section).")] = 0,
    c: Annotated[str, typer.Option(help="Comma-separated C values, chosen per class by 3-fold CV AP.")] = "0.01,0.1,1,10",
    out: Annotated[Optional[Path], typer.Option(help="Folder for the AP table as JSON and CSV.")] = None,
    overrides: SetOpt = None,
    verbose: bool = False,
):
    """The off-the-shelf baseline: L2-normalised features, one linear classifier per class, VOC AP."""
    with session(verbose):
        from .linear import linear_baseline
        from .extract import build_extractor

        r, reduce = _pooled_recipe(recipe, overrides, pool)
        table, model = linear_baseline(r, train_split or r.data.train_split, eval_split or r.data.val_split,
                                       build_extractor, method, reduce, views, _c_grid(c))
        typer.echo(table.format())
        typer.echo("chosen C: " + ", ".join(f"{n} {v:g}" for n, v in zip(model.classes, model.cs)))
        _write_table(table, out or r.run_dir, f"linear_{method}_{pool}" + (f"_views{views}" if views else ""))


@app.command()
def layers(
    recipe: RecipeOpt,
    train_split: Annotated[Optional[str], typer.Option("--train-split", help="Training split (default: the recipe's).")] = None,
    val_split: Annotated[Optional[str], typer.Option("--val-split", help="Scored split (default: the recipe's val).")] = None,
    pool: Annotated[str, typer.Option(help="whole: each stage averaged over the image and its mirror; max: averaged "
                                           "over each patch (shared mode), max-pooled over the image's patches.")] = "whole",
    methods: Annotated[str, typer.Option(help="Comma-separated: svm (linear SVM), logreg (logistic regression).")] = "svm,logreg",
    c: Annotated[str, typer.Option(help="Comma-separated C values, chosen per class by 3-fold CV AP.")] = "0.01,0.1,1,10",
    out: Annotated[Optional[Path], typer.Option(help="Folder for layers.json and layers.png "
                                                     "(default: <output>/<name>/layers_<pool>).")] = None,
    overrides: SetOpt = None,
    verbose: bool = False,
):
    """Per-layer transfer: a linear classifier on each stage of the trunk, one trunk pass per image for all."""
    with session(verbose):
        from .layers import layer_study, write_study

        r = load_recipe(recipe, overrides)
        study = layer_study(r, train_split or r.data.train_split, val_split or r.data.val_split, pool,
                            [m.strip() for m in methods.split(",") if m.strip()], _c_grid(c))
        typer.echo(study.format())
        json_path, png_path = write_study(study, out or r.run_dir / f"layers_{pool}")
        typer.echo(f"wrote {json_path} and {png_path}")


def _c_grid(c: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in c.split(","))
    except ValueError:
        raise RecipeError(f"--c must be comma-separated numbers, got {c!r}") from None


@app.command()
def retrieve(
    recipe: RecipeOpt,
    split: Annotated[str, typer.Option(help="The collection: a split of the recipe's dataset.")],
    queries: Annotated[Optional[str], typer.Option(help="Comma-separated image ids of the split to query.")] = None,
    query_images: Annotated[Optional[list[Path]], typer.Option("--query-image", help="An image file to query.")] = None,
    num_queries: Annotated[int, typer.Option(help="Queries drawn from the split when none are named.")] = 8,
    k: Annotated[int, typer.Option(help="Neighbours shown per query and per image of the map.")] = 8,
    pool: PoolOpt = "whole",
    out: Annotated[Path, typer.Option(help="The HTML page to write.")] = Path("retrieval.html"),
    overrides: SetOpt = None,
    verbose: bool = False,
):
    """Nearest neighbours by L2 distance and a t-SNE map of the split, as one self-contained HTML page;
    prints precision@k per class."""
    with session(verbose):
        from .retrieve import retrieval_page

        r, reduce = _pooled_recipe(recipe, overrides, pool)
        names = [q.strip() for q in queries.split(",")] if queries else []
        f, precision = retrieval_page(r, split, reduce, out, names, list(query_images or []), num_queries, k,
                                      f"{pool} features")
        width = max(len(c) for c in f.classes)
        for c, p in zip(f.classes, precision):
            typer.echo(f"{c:<{width}}  P@{k} {'n/a' if np.isnan(p) else f'{100 * p:.1f}'}")
        typer.echo(f"{'mean':<{width}}  P@{k} {100 * np.nanmean(precision):.1f}")
        typer.echo(f"wrote {out}")


cache_app = typer.Typer(no_args_is_help=True, help="Check the feature caches of a folder.")
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="The folder of caches (runtime.cache_dir).")] = Path(
        ".cache/features"),
    delete: Annotated[bool, typer.Option("--delete-damaged", help="Delete damaged caches (the next run rebuilds "
                                                                  "them) and damaged chunks of unfinished builds.")] = False,
    verbose: bool = False,
):
    """Check every cache of a folder: each file's size and CRC-32 against those recorded when it was written.

    Exit code 1 when a cache is damaged (and not deleted).
    """
    with session(verbose):
        import shutil

        from .cache import verify_cache

        if not cache_dir.is_dir():
            raise PatchnetError(f"{cache_dir}: no such folder; give the runtime.cache_dir of your runs with --cache-dir")
        folders = sorted(p for p in cache_dir.iterdir() if p.is_dir() and (p / "meta.json").is_file())
        if not folders:
            typer.echo(f"{cache_dir}: holds no caches")
            return
        bad = 0
        for folder in folders:
            status = verify_cache(folder)
            damaged = not status.startswith(("ok", "incomplete (")) or "damaged:" in status
            if damaged and delete:
                if status.startswith("incomplete"):
                    for name in status.split("damaged: ", 1)[1].rstrip(")").split(", "):
                        (folder / "chunks" / name).unlink(missing_ok=True)
                else:
                    shutil.rmtree(folder)
                status += " -> deleted"
            bad += damaged and not delete
            typer.echo(f"{folder.name}  {status}")
        typer.echo(f"{len(folders)} caches, {bad} damaged" + ("; rerun with --delete-damaged to delete them (the next "
                                                               "run rebuilds them)" if bad else ""))
        if bad:
            raise typer.Exit(1)


DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


@app.command()
def demo(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="The demo recipe.")] = DEMO_RECIPE,
    overrides: SetOpt = None,
    verbose: bool = False,
):
    """The embedded default: generate the demo set, train on it, evaluate on its test split."""
    with session(verbose):
        from .infer import evaluate_split
        from .train import train as run

        r = load_recipe(recipe, overrides)
        result = run(r)
        table, n, _ = evaluate_split(result.run_dir / "best.pt", split="test")
        typer.echo(table.format())
        typer.echo(f"demo: trained in {result.seconds:.0f} s; test mAP {100 * table.map07:.1f} (VOC07 11-point), "
                   f"{100 * table.map:.1f} (envelope) on {n} images")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
