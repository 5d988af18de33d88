#!/usr/bin/env python
"""Render patch-score heatmaps: where in each image a trained patchnet found each class.

    python tools/render_heatmaps.py --checkpoint checkpoints/voc07_dev/best.pt photo.jpg photos/
    python tools/render_heatmaps.py --checkpoint ... --split devval --limit 20 --classes dog,person

Each pixel shows the mean (or max) over the patches covering it of their value for the class: y(c|P)
for a model scored by the power-k mean, the sigmoid of the patch's evidence for evidence poolings. For every image a PNG
holds the top-k predicted classes (or the classes named) side by side; --no-grid writes one PNG
per class instead. A dataset split uses the feature cache when it is warm. File names come from the
image ids and class names made safe (patchnet.files.safe_name), always inside --out. An image that
cannot be read is skipped with a warning; the others are drawn, and the exit code is then 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tqdm.auto import tqdm

from patchnet.cli import Skipped, session
from patchnet.data import DatasetError, data_override, image_files, load_image, open_split
from patchnet.evaluation.predictor import Predictor
from patchnet.evaluation.scoring import InferOptions
from patchnet.features.build import cache_spec, cached_features
from patchnet.files import UniqueNames, output_path
from patchnet.outputs.heatmaps import class_index, render_heatmaps, top_classes


def main(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or folders.")] = None,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A trained best.pt or last.pt.")] = ...,
    split: Annotated[str | None, typer.Option(help="A split of the recipe's dataset instead of files.")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root for --split (default: the recipe's).")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names (default: the top-k).")] = None,
    top: Annotated[int, typer.Option(help="Top-scoring classes drawn per image.")] = 3,
    reduce: Annotated[str, typer.Option(help="Per-pixel reduction over covering patches: mean or max.")] = "mean",
    grid: Annotated[bool, typer.Option(help="All classes of an image in one PNG (else one PNG each).")] = True,
    mode: Annotated[str | None, typer.Option(help="Patch features: exact or shared (default: as trained).")] = None,
    pool: Annotated[str | None, typer.Option(help="Pooling: power, max, lse or topk (default: the model's).")] = None,
    prior: Annotated[
        float | None,
        typer.Option(help="Pseudo-patches of the image mean per pixel (default: the recipe's infer.map_prior)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many images (0: all).")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("heatmaps"),
):
    with session():
        if reduce not in ("mean", "max"):
            raise DatasetError(f"--reduce must be mean or max, got {reduce!r}")
        predictor = Predictor(checkpoint, InferOptions(mode=mode, pool=pool, map_prior=prior))
        recipe = predictor.recipe
        names = predictor.classes
        chosen = class_index(names, [c.strip() for c in classes.split(",")]) if classes else None
        jobs = []  # (name, image path, cached (boxes, features) or None)
        if split:
            recipe.data = data_override(recipe.data, data)
            dataset = open_split(recipe.data, split, classes=names)
            spec = cache_spec(recipe, predictor.extractor, codec=predictor.codec)
            store = cached_features(spec, dataset, predictor.extractor)
            for i, rec in enumerate(dataset.records):
                cached = (
                    (store.patch_boxes[store.item_slice(i)], store.rows[store.item_slice(i)])
                    if store is not None and store.ok[i]
                    else None
                )
                jobs.append((rec.image_id, rec.path, cached))
            if store is not None:
                typer.echo(f"using the warm feature cache {store.path}")
        else:
            jobs = [(p.stem, p, None) for p in image_files(images or [])]
        if not jobs:
            raise DatasetError("no images: give image files or folders, or --split")
        jobs = jobs[:limit] if limit else jobs
        written, files, skipped = 0, UniqueNames(), Skipped(len(jobs))
        out.mkdir(parents=True, exist_ok=True)
        for name, path, cached in tqdm(jobs, desc="heatmaps", unit="img"):
            try:
                image = load_image(path, recipe.data.max_pixels)
            except DatasetError as e:
                skipped.add(str(path), e)
                continue
            if cached is None:
                p = predictor.predict(image)
            else:
                p = predictor.predict_features(cached[1], cached[0], image.shape[1], image.shape[0])
            cls = chosen or top_classes(p.scores, top)
            for group in [cls] if grid else [[c] for c in cls]:
                stem = name if grid else f"{name}_{names[group[0]]}"
                render_heatmaps(
                    image,
                    p.boxes,
                    p.values,
                    p.scores,
                    names,
                    group,
                    output_path(out, stem, ".png", files),
                    reduce,
                    probabilities=p.probabilities,
                    prior=predictor.map_prior(),
                )
                written += 1
        typer.echo(f"wrote {written} heatmap PNGs to {out}")
        skipped.finish()


if __name__ == "__main__":
    typer.run(main)
