"""Studying the trunk's features: ``patchnet features``, ``linear``, ``layers`` and ``retrieve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..files import atomic_write
from ..recipe import RecipeError, load_recipe
from .common import DeviceOpt, RecipeOpt, SetOpt, VerboseOpt, app, on_device, session
from .run import write_table

# --features: how an image's feature vector is pooled (--pool, in eval and predict, pools patch scores)
FeaturesOpt = Annotated[
    str,
    typer.Option(
        "--features",
        help="How each image's feature is pooled: whole (one pass on the image and its mirror, averaged), "
        "mean or max (over the recipe's multi-scale patch grid).",
    ),
]
OldPoolOpt = Annotated[str | None, typer.Option("--pool", hidden=True, help="The old name of --features.")]
TrainSplitOpt = Annotated[
    str | None, typer.Option("--train-split", help="Training split (default: the recipe's data.train_split).")
]
ScoredSplitOpt = Annotated[
    str | None, typer.Option("--split", help="Scored split (default: the recipe's data.val_split).")
]


def _pooled_recipe(recipe_path: Path, overrides, pool: str, device: str | None = None):
    from ..studies.linear import whole_image_recipe

    r = on_device(load_recipe(recipe_path, overrides), device)
    if pool not in ("whole", "mean", "max"):
        raise RecipeError(f"--features must be whole, mean or max; got {pool!r}")
    return (whole_image_recipe(r) if pool == "whole" else r), ("mean" if pool == "whole" else pool)


@app.command()
def features(
    recipe: RecipeOpt,
    split: Annotated[str, typer.Option(help="Split of the recipe's dataset.")],
    out: Annotated[Path, typer.Option(help="Output .npz: ids, features, labels, classes.")],
    pool: FeaturesOpt = "whole",
    old_pool: OldPoolOpt = None,
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
):
    """Extract one feature per image of a split (FC6/FC7 of alexnet/vgg16: --set backbone.layer=fc6)."""
    with session(verbose):
        from ..data import open_split
        from ..features.extract import build_extractor
        from ..studies.linear import split_features

        r, reduce = _pooled_recipe(recipe, overrides, old_pool or pool, device)
        f = split_features(r, open_split(r.data, split), build_extractor(r), reduce)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out,
            lambda fh: np.savez(
                fh, ids=np.array(f.ids), features=f.features, labels=f.labels, classes=np.array(f.classes)
            ),
        )
        typer.echo(f"wrote {out}: {f.features.shape[0]} images x {f.features.shape[1]} features")


@app.command()
def linear(
    recipe: RecipeOpt,
    train_split: TrainSplitOpt = None,
    eval_split: ScoredSplitOpt = None,
    old_train: Annotated[
        str | None, typer.Option("--train", hidden=True, help="The old name of --train-split.")
    ] = None,
    old_eval: Annotated[str | None, typer.Option("--eval", hidden=True, help="The old name of --split.")] = None,
    method: Annotated[str, typer.Option(help="svm (linear SVM) or logreg (logistic regression).")] = "svm",
    pool: FeaturesOpt = "whole",
    old_pool: OldPoolOpt = None,
    views: Annotated[int, typer.Option(help="Augmented views per training image (the recipe's aug section).")] = 0,
    c: Annotated[
        str, typer.Option(help="Comma-separated C values, chosen per class by 3-fold CV AP.")
    ] = "0.01,0.1,1,10",
    out: Annotated[Path | None, typer.Option(help="Folder for the AP table as JSON and CSV.")] = None,
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
):
    """The off-the-shelf baseline: L2-normalised features, one linear classifier per class, VOC AP."""
    with session(verbose):
        from ..features.extract import build_extractor
        from ..studies.linear import linear_baseline

        pool = old_pool or pool
        r, reduce = _pooled_recipe(recipe, overrides, pool, device)
        table, model = linear_baseline(
            r,
            train_split or old_train or r.data.train_split,
            eval_split or old_eval or r.data.val_split,
            build_extractor,
            method,
            reduce,
            views,
            _c_grid(c),
        )
        typer.echo(table.format())
        typer.echo("chosen C: " + ", ".join(f"{n} {v:g}" for n, v in zip(model.classes, model.cs)))
        write_table(table, out or r.run_dir, f"linear_{method}_{pool}" + (f"_views{views}" if views else ""))


@app.command()
def layers(
    recipe: RecipeOpt,
    train_split: TrainSplitOpt = None,
    val_split: ScoredSplitOpt = None,
    old_val: Annotated[str | None, typer.Option("--val-split", hidden=True, help="The old name of --split.")] = None,
    pool: Annotated[
        str,
        typer.Option(
            "--features",
            help="How each stage's feature is pooled: whole (averaged over the image and its mirror) or max "
            "(averaged over each patch, shared mode, then max-pooled over the image's patches).",
        ),
    ] = "whole",
    old_pool: OldPoolOpt = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated: svm (linear SVM), logreg (logistic regression).")
    ] = "svm,logreg",
    c: Annotated[
        str, typer.Option(help="Comma-separated C values, chosen per class by 3-fold CV AP.")
    ] = "0.01,0.1,1,10",
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for layers.json and layers.png (default: <output>/<name>/layers_<features>)."),
    ] = None,
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
):
    """Per-layer transfer: a linear classifier on each stage of the trunk, one trunk pass per image for all."""
    with session(verbose):
        from ..studies.layers import layer_study, write_study

        pool = old_pool or pool
        r = on_device(load_recipe(recipe, overrides), device)
        study = layer_study(
            r,
            train_split or r.data.train_split,
            val_split or old_val or r.data.val_split,
            pool,
            [m.strip() for m in methods.split(",") if m.strip()],
            _c_grid(c),
        )
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
    queries: Annotated[str | None, typer.Option(help="Comma-separated image ids of the split to query.")] = None,
    query_images: Annotated[list[Path] | None, typer.Option("--query-image", help="An image file to query.")] = None,
    num_queries: Annotated[int, typer.Option(help="Queries drawn from the split when none are named.")] = 8,
    k: Annotated[
        int,
        typer.Option("--neighbours", help="Neighbours shown per query and per image of the map (the k of P@k)."),
    ] = 8,
    old_k: Annotated[int | None, typer.Option("--k", hidden=True, help="The old name of --neighbours.")] = None,
    pool: FeaturesOpt = "whole",
    old_pool: OldPoolOpt = None,
    out: Annotated[Path, typer.Option(help="The HTML page to write.")] = Path("retrieval.html"),
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
):
    """Nearest neighbours by L2 distance and a t-SNE map of the split, as one self-contained HTML page;
    prints precision@k per class."""
    with session(verbose):
        from ..studies.retrieve import retrieval_page

        k = k if old_k is None else old_k
        pool = old_pool or pool
        r, reduce = _pooled_recipe(recipe, overrides, pool, device)
        names = [q.strip() for q in queries.split(",")] if queries else []
        f, precision = retrieval_page(
            r, split, reduce, out, names, list(query_images or []), num_queries, k, f"{pool} features"
        )
        width = max(len(c) for c in f.classes)
        for c, p in zip(f.classes, precision):
            typer.echo(f"{c:<{width}}  P@{k} {'n/a' if np.isnan(p) else f'{100 * p:.1f}'}")
        typer.echo(f"{'mean':<{width}}  P@{k} {100 * np.nanmean(precision):.1f}")
        typer.echo(f"wrote {out}")
