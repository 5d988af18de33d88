#!/usr/bin/env python
"""Tile the annotated images that ``patchnet predict --out`` wrote into one JPEG contact sheet (docs/predict_sheet.jpg).

    patchnet predict -c checkpoints/voc07_model/best.pt photos/ --out predictions/
    python tools/predict_sheet.py predictions/ docs/predict_sheet.jpg --limit 10

The images are taken in the order of predictions.json, each scaled to --width pixels wide, --cols to a row; the
sheet is written atomically, in JPEG at --quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image

from patchnet.cli import session
from patchnet.data import DatasetError
from patchnet.files import atomic_write


def main(
    folder: Annotated[Path, typer.Argument(help="A folder written by patchnet predict --out.")],
    out: Annotated[Path, typer.Argument(help="The sheet to write, e.g. docs/predict_sheet.jpg.")],
    limit: Annotated[int, typer.Option(help="At most this many images (0: all).")] = 10,
    cols: Annotated[int, typer.Option(min=1, help="Images per row.")] = 5,
    width: Annotated[int, typer.Option(min=32, help="Width of each image on the sheet, in pixels.")] = 360,
    quality: Annotated[int, typer.Option(min=1, max=95, help="JPEG quality of the sheet.")] = 80,
):
    with session():
        listing = folder / "predictions.json"
        if not listing.is_file():
            raise DatasetError(f"{folder} holds no predictions.json; write it with patchnet predict ... --out {folder}")
        outputs = json.loads(listing.read_text())["outputs"]
        names = [files["annotated"] for files in outputs.values()]
        names = names[:limit] if limit else names
        if not names:
            raise DatasetError(f"{listing} lists no annotated images")
        tiles = []
        for name in names:
            with Image.open(folder / name) as im:
                tiles.append(im.convert("RGB").resize((width, round(im.height * width / im.width)), Image.LANCZOS))
        rows = [tiles[i : i + cols] for i in range(0, len(tiles), cols)]
        heights = [max(t.height for t in row) for row in rows]
        gap = 4
        sheet = Image.new("RGB", (cols * width + (cols - 1) * gap, sum(heights) + gap * (len(rows) - 1)), "white")
        y = 0
        for row, h in zip(rows, heights):
            for j, tile in enumerate(row):
                sheet.paste(tile, (j * (width + gap), y + (h - tile.height) // 2))
            y += h + gap
        atomic_write(out, lambda f: sheet.save(f, "JPEG", quality=quality, optimize=True))
        typer.echo(
            f"wrote {out}: {len(tiles)} images, {sheet.width}x{sheet.height} px, {out.stat().st_size // 1024} KB"
        )


if __name__ == "__main__":
    typer.run(main)
