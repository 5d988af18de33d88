#!/usr/bin/env python
"""Top-9 patches per class over a dataset split, as 3x3 contact sheets (the Zeiler & Fergus view).

    python tools/top_patches.py --checkpoint checkpoints/voc07_dev/best.pt --split devval

For each class, the 9 images whose best patch scores highest for it contribute that patch; under
each crop are the image id and the patch's value for the class (y(c|P), or the sigmoid of its
evidence). Features come from (and go to) the feature cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image
from tqdm.auto import tqdm

from patchnet.cli import Skipped, session
from patchnet.data import DatasetError, data_override, load_image, open_split
from patchnet.evaluation.predictor import Predictor
from patchnet.features.build import build_features, cache_spec
from patchnet.files import UniqueNames, output_path
from patchnet.outputs.heatmaps import best_patch_per_item, class_index, contact_sheet, top_items


def crop(image: np.ndarray, box: np.ndarray, size: int = 160) -> np.ndarray:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    patch = Image.fromarray(image[max(y1, 0) : y2, max(x1, 0) : x2])
    return np.asarray(patch.resize((size, size), Image.BILINEAR))


def main(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A trained best.pt or last.pt.")],
    split: Annotated[str | None, typer.Option(help="Split to search (default: the recipe's val split).")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (default: the recipe's).")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names (default: all).")] = None,
    n: Annotated[int, typer.Option(help="Patches per class.")] = 9,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("top_patches"),
):
    with session():
        predictor = Predictor(checkpoint)
        recipe = predictor.recipe
        recipe.data = data_override(recipe.data, data)
        names = predictor.classes
        dataset = open_split(recipe.data, split or recipe.data.val_split, classes=names)
        wanted = class_index(names, [c.strip() for c in classes.split(",")]) if classes else range(len(names))
        store = build_features(
            cache_spec(recipe, predictor.extractor, codec=predictor.codec), dataset, predictor.extractor
        )
        scores, patches = best_patch_per_item(store.rows, store.offsets, predictor.head, len(names), predictor.pool)
        usable = store.ok & (store.view == 0)
        files, skipped = UniqueNames(), Skipped(len(dataset))
        out.mkdir(parents=True, exist_ok=True)
        for c in tqdm(wanted, desc="top patches", unit="class"):
            crops, captions = [], []
            for i in top_items(scores, usable, c, n):
                rec = dataset.records[store.record[i]]
                box = store.patch_boxes[int(store.offsets[i]) + int(patches[i, c])]
                try:
                    crops.append(crop(load_image(rec.path), box))
                except DatasetError as e:  # changed since its features were cached
                    skipped.add(str(rec.path), e)
                    continue
                captions.append(f"{rec.image_id}  {scores[i, c]:.3f}")
            contact_sheet(
                crops,
                captions,
                f"{names[c]}: top {len(crops)} patches of {dataset.name.rsplit(':', 1)[-1]}",
                output_path(out, f"top{n}_{names[c]}", ".png", files),
            )
        typer.echo(f"wrote {len(wanted)} contact sheets to {out}")
        skipped.finish()


if __name__ == "__main__":
    typer.run(main)
