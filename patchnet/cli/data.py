"""Looking at data and caches: ``patchnet inspect`` and ``patchnet cache verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..data import DatasetError
from ..errors import PatchnetError
from .common import DataArg, DataFormatOpt, SetOpt, VerboseOpt, app, session


@app.command()
def inspect(
    data: DataArg = None,
    old_data: Annotated[Path | None, typer.Option("--data", hidden=True, help="The old name of DATA.")] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Split to look at. Default: the one patchnet train trains on.", show_default=False),
    ] = None,
    fmt: DataFormatOpt = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", "-r", help="Recipe for patch settings. Default: the default recipe.", show_default=False
        ),
    ] = None,
    overrides: SetOpt = None,
    image: Annotated[
        str | None, typer.Option(help="Image id to draw. Default: the first with several objects.", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("inspect.png"),
    verbose: VerboseOpt = False,
):
    """Print what a folder holds (format, splits, classes per split) and draw one image's patches coloured by
    training label."""
    with session(verbose):
        from ..data import image_label_statistics, open_split
        from ..outputs.draw import draw_labels
        from ..patches.labels import split_statistics
        from ..training.setup import layout_table, open_run_splits, run_recipe

        root = data or old_data
        if root is None:
            raise PatchnetError("give the folder to look at: patchnet inspect photos/")
        r, layout = run_recipe(root, recipe, overrides, fmt=fmt)
        if split is None:  # what patchnet train would find: the table of its splits
            splits = open_run_splits(r)
            typer.echo(layout_table(r, layout, splits, r.runtime.device))
            dataset = splits[r.data.train_split]
        else:  # that split alone: another split that cannot be read does not stop it
            assert layout is not None  # run_recipe found the layout of root
            typer.echo(f"{layout.root} ({layout.format}); splits: {', '.join(layout.splits)}")
            dataset = open_split(r.data, split)
        typer.echo(image_label_statistics(dataset))
        if not dataset.has_boxes:
            typer.echo("no boxes: patchnet train learns from the image labels (no patch labels to draw)")
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


cache_app = typer.Typer(no_args_is_help=True, help="Check the feature caches of a folder.")
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="The folder of caches (runtime.cache_dir).")] = Path(
        ".cache/features"
    ),
    delete: Annotated[
        bool,
        typer.Option(
            "--delete-damaged",
            help="Delete damaged caches (the next run rebuilds them) and damaged chunks of unfinished builds.",
        ),
    ] = False,
    verbose: VerboseOpt = False,
):
    """Check every cache of a folder: each file's size and CRC-32 against those recorded when it was written.

    Exit code 1 when a cache is damaged (and not deleted).
    """
    with session(verbose):
        import shutil

        from ..store import cache_folders, verify_cache

        if not cache_dir.is_dir():
            raise PatchnetError(
                f"{cache_dir}: no such folder; give the runtime.cache_dir of your runs with --cache-dir"
            )
        folders = list(cache_folders(cache_dir))
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
            typer.echo(f"{folder.relative_to(cache_dir)}  {status}")
        typer.echo(
            f"{len(folders)} caches, {bad} damaged"
            + ("; rerun with --delete-damaged to delete them (the next run rebuilds them)" if bad else "")
        )
        if bad:
            raise typer.Exit(1)
