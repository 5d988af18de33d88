#!/usr/bin/env python
"""Write a trained run as a shipped model: the slim checkpoint ``patchnet.load(NAME)`` finds by name.

    patchnet train --recipe recipes/voc07_model.yaml            # all 2500 VOC2007 train images of ../shared/data
    python tools/ship_model.py checkpoints/voc07/last.pt --name voc07

Keeps what scoring needs (the head, its recipe, classes, fusion, calibration, codec, int8 ranges) and
drops what only resuming needs (optimizer, schedule, random states, history); the head's weights are
stored in fp16, and loaded back as fp32. ``--check DIR`` scores the images in DIR with both the run's
checkpoint and the slim copy and prints the largest difference of their probabilities. The card (data,
recipe, commit) travels in the file as ``card``.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from patchnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from patchnet.cli import session
from patchnet.models import HERE, SHIPPED


def slim(state: Checkpoint, card: dict) -> Checkpoint:
    """What scoring reads (no training state, history or data fingerprint), floating-point weights of the head
    (and unlocked stages) in fp16."""

    def half(weights: dict | None) -> dict | None:
        return None if weights is None else {n: t.half() if t.is_floating_point() else t for n, t in weights.items()}

    recipe = {**state.recipe, "runtime": {**state.recipe["runtime"], "cache_dir": ".cache/features"}}
    weights = {"head": half(state.head), "trunk": half(state.trunk)}
    return replace(state, **weights, recipe=recipe, history=[], training=None, data=None, card=card)


def main(
    checkpoint: Annotated[Path, typer.Argument(help="The run's last.pt (or best.pt).")],
    name: Annotated[str, typer.Option(help=f"The shipped name; one of {', '.join(SHIPPED)}.")] = "voc07",
    data: Annotated[str, typer.Option(help="What it was trained on, for its card.")] = (
        "the 2500 VOC2007 train images (../shared/data), recipes/voc07_model.yaml"
    ),
    check: Annotated[Path | None, typer.Option(help="Folder of images to compare both copies on.")] = None,
):
    """Write CHECKPOINT as the shipped model NAME (patchnet/models/)."""
    with session():
        if name not in SHIPPED:
            raise typer.BadParameter(f"--name must be one of {', '.join(SHIPPED)} (patchnet/models/__init__.py)")
        state = load_checkpoint(checkpoint)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        card = {"name": name, "data": data, "commit": commit, "epochs": len(state.history)}
        target = HERE / SHIPPED[name]
        save_checkpoint(slim(state, card), target)
        typer.echo(
            f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB; {checkpoint.stat().st_size / 1e6:.1f} MB before)"
        )
        if check is not None:
            from patchnet import load
            from patchnet.data import image_files

            full, small = load(checkpoint), load(name)
            files = image_files([check])
            a = full.predict(files)
            b = small.predict(files)
            da = np.abs(a.scores - b.scores).max()
            dp = np.abs(a.probabilities - b.probabilities).max() if a.probabilities is not None else float("nan")
            same = (np.argsort(-a.scores, 1)[:, :3] == np.argsort(-b.scores, 1)[:, :3]).all()
            typer.echo(
                f"{len(files)} images: max |score diff| {da:.2e}, max |probability diff| {dp:.2e}, top-3 same: {same}"
            )


if __name__ == "__main__":
    typer.run(main)
