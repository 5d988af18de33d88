"""The recipe of a run on a user's folder: the default recipe (or a recipe file), the layout found in the
folder, the common options, then ``--set``, each on top of the one before.

``run_recipe`` resolves it; ``layout_table`` says what was found, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset, Layout, detect_layout, open_split
from ..files import safe_name
from ..recipe import Recipe, RecipeError, apply_overrides, merge_values, read_values, recipe_from_dict

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"


@dataclass
class RunOptions:
    """The options every run takes as flags (``patchnet train --name ... --epochs ...``); None keeps the recipe's."""

    name: str | None = None
    epochs: int | None = None
    backbone: str | None = None
    device: str | None = None
    output: str | None = None

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        for section, key, value in (
            ("train", "epochs", self.epochs),
            ("backbone", "name", self.backbone),
            ("runtime", "device", self.device),
            ("runtime", "output", self.output),
        ):
            if value is not None:
                out.setdefault(section, {})[key] = value
        return out


def run_name(root: Path) -> str:
    """A run's name from its data folder's: ``~/photos/`` -> ``photos`` (through the one sanitiser)."""
    return safe_name(root.resolve().name or "run")


def run_recipe(
    data: str | Path | None = None,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    options: RunOptions | None = None,
    fmt: str | None = None,
) -> tuple[Recipe, Layout | None]:
    """The recipe of a run, and the layout found in ``data`` (None without ``data``).

    With ``data``, its ``data`` section comes from the folder (format, splits, classes, boxes), the
    supervision becomes ``images`` where it has no boxes, and the run is named after it; the recipe file
    (default: the default recipe) gives every other setting. ``options`` and then ``overrides`` win.
    """
    if data is None and recipe is None:
        raise RecipeError(
            "give a folder of images (patchnet train photos/) or a recipe (patchnet train --recipe "
            "recipes/voc07_dev.yaml)"
        )
    path = Path(recipe) if recipe is not None else DEFAULT_RECIPE
    values = read_values(path)
    layout = None
    if data is not None:
        # a split the user names decides what the folder names are (splits or classes)
        wanted = apply_overrides({}, list(overrides or [])).get("data", {}).get("train_split")
        layout = detect_layout(data, fmt, wanted if isinstance(wanted, str) else None)
        found: dict[str, Any] = {"data": layout.data_values()}
        if recipe is None:
            found["name"] = run_name(Path(data))
        if not layout.boxes:  # image labels are all there is to learn from
            found["train"] = {"supervision": "images"}
        values = merge_values(values, found)
    values = merge_values(values, (options or RunOptions()).values())
    return recipe_from_dict(values, overrides), layout


def check_new_run(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an earlier run of the same name unless told to continue it or start anew."""
    from ..checkpoint import CheckpointError

    if not resume and not overwrite and (recipe.run_dir / "last.pt").is_file():
        raise CheckpointError(
            f"{recipe.run_dir} already holds a run (last.pt); continue it with --resume, train anew "
            f"over it with --overwrite, or name this run otherwise with --name NAME"
        )


def split_counts(dataset: Dataset) -> np.ndarray:
    """(C,) images per class (present, difficult-only excluded)."""
    return (dataset.labels() == 1).sum(0)


def layout_table(recipe: Recipe, layout: Layout | None, splits: dict[str, Dataset], device: str) -> str:
    """What a run found and will do, as a table: format, splits, classes with images per split, supervision,
    name, backbone, device. ``splits``: split name -> its dataset (train first)."""
    d = recipe.data
    lines = []
    if layout is not None:
        lines.append(f"data        {layout.root} ({layout.format})")
    else:
        lines.append(f"data        {d.root} ({d.format})")
    for name, ds in splits.items():
        role = (
            "train"
            if name == d.train_split
            else f"val: {d.val_from_train:.0%} of {'the training images' if d.train_split == '.' else d.train_split} "
            "held out (the same images every run)"
            if d.val_from_train and name == d.val_split
            else "val (reported, never chosen on)"
        )
        lines.append(f"split       {name if name != '.' else '(the folder)'}: {len(ds)} images, {role}")
    if layout is not None:
        lines += [f"            {note}" for note in layout.notes]
    train = next(iter(splits.values()), None)
    if train is not None:
        kinds = "single-label" if train.single_label else "multi-label"
        lines.append(f"classes     {len(train.classes)} ({kinds})")
        width = max(len(c) for c in [*train.classes, "class"])
        names = [n if n != "." else "images" for n in splits]
        lines.append("            " + f"{'class':<{width}}  " + "  ".join(f"{n:>8}" for n in names))
        counts = [split_counts(ds) for ds in splits.values()]
        for c, cls in enumerate(train.classes):
            lines.append("            " + f"{cls:<{width}}  " + "  ".join(f"{int(n[c]):>8}" for n in counts))
    sup = recipe.train.supervision
    why = {"images": "image labels (no boxes)", "both": "boxes and image labels", "boxes": "boxes (patch labels)"}
    lines.append(f"supervision {sup}: {why[sup]}")
    lines.append(f"run         {recipe.name} -> {recipe.run_dir}")
    lines.append(f"backbone    {recipe.backbone.name} ({recipe.patches.mode} patches), device {device}")
    return "\n".join(lines)


def open_run_splits(recipe: Recipe) -> dict[str, Dataset]:
    """The training and val splits of a run as read (the table's counts), train first."""
    train = open_split(recipe.data, recipe.data.train_split)
    out = {recipe.data.train_split: train}
    if recipe.data.val_split:
        out[recipe.data.val_split] = open_split(recipe.data, recipe.data.val_split, classes=train.classes)
    return out
