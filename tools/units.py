#!/usr/bin/env python
"""What units of the frozen trunk see: first-layer filters and the top-9 patches of each channel of a stage.

    python tools/units.py --recipe recipes/voc07_dev.yaml --split devval --limit 500 --layer stage4

Writes <out>/filters.png (the first convolution's filters, each scaled to [0, 1]) and
<out>/units_<layer>.png: for the --channels most active channels of the stage, the 9 images where
each peaks highest (one location per image), cropped to the unit's receptive field there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from patchnet.cli import session
from patchnet.recipe import load_recipe
from patchnet.studies.units import unit_views


def main(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe: backbone and dataset.")],
    split: Annotated[str | None, typer.Option(help="Split to search (default: the recipe's val split).")] = None,
    limit: Annotated[int, typer.Option(help="Use the first N images of the split (0: all).")] = 0,
    layer: Annotated[str, typer.Option(help="Stage of the backbone (default: its middle convolutional stage).")] = "",
    channels: Annotated[int, typer.Option(help="Most active channels shown (0: all).")] = 32,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("units"),
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a recipe field.")] = None,
):
    with session():
        r = load_recipe(recipe, overrides)
        if limit:
            r = replace(r, data=replace(r.data, limit=limit))
        filters, sheet = unit_views(r, split or r.data.val_split, layer, channels, out)
        typer.echo(f"wrote {filters} and {sheet}")


if __name__ == "__main__":
    typer.run(main)
