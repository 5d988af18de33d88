"""Per-layer transfer: how well each depth of the frozen trunk serves a linear classifier.

The stages of a backbone (``BackboneSpec.stages``: the ends of its blocks, then its feature; for
AlexNet and VGG conv1..conv5, FC6 and FC7, the DeCAF analogue) all come from one trunk pass per
image. Each stage's map becomes one vector per image:
- ``whole``: its mean over the whole map, for the image and its mirror image, averaged (the
  whole-image features of ``patchnet linear``; FC6/FC7 from the RoI grid of the last map);
- ``max``: its mean over each patch of the recipe's grid (shared mode, the recipe's levels),
  max-pooled over the patches of the image (the box-free ``--features max`` baseline).
The vectors of a split are cached on disk (a ``patchnet.store`` folder, one row file per stage), keyed by
everything they depend on. On each stage a linear SVM and/or logistic regression is fit per class
(``patchnet.studies.linear``, C by cross-validation on the training split) and scored on the other split by VOC AP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data import open_split
from ..errors import PatchnetError
from ..evaluation.metrics import APTable, ap_table
from ..features.stages import build_stage_extractor, stage_features, stage_recipe
from ..files import atomic_write
from ..recipe import Recipe
from .linear import C_GRID, fit_linear
from .receptive import stage_receptive_field

METHODS = ("svm", "logreg")


@dataclass
class LayerResult:
    """The scores of linear classifiers on one stage's vectors."""

    stage: str
    dim: int
    stride: int
    receptive_field: float  # input pixels seen by one cell of the stage's map
    tables: dict[str, APTable]  # method -> AP table of the scored split
    cs: dict[str, list[float]]  # method -> the C chosen for each class


@dataclass
class LayerStudy:
    recipe: str
    backbone: str
    pool: str
    train_split: str
    val_split: str
    train_images: int
    val_images: int
    methods: list[str]
    results: list[LayerResult]

    def format(self) -> str:
        """A plain-text table: one row per stage, mAP (11-point / envelope) per method, in percent."""
        single = self.results[0].tables[self.methods[0]].top1 is not None
        width = max(len("stage"), *(len(r.stage) for r in self.results))
        head = f"{'stage':<{width}}  {'dim':>5}  {'stride':>6}  {'RF':>5}"
        for m in self.methods:
            head += f"  {m + ' mAP07':>12}  {m + ' mAP':>11}" + (f"  {m + ' top-1':>12}" if single else "")
        lines = [head]
        for r in self.results:
            row = f"{r.stage:<{width}}  {r.dim:>5}  {r.stride:>6}  {r.receptive_field:>5.0f}"
            for m in self.methods:
                t = r.tables[m]
                row += f"  {_pct(t.map07):>12}  {_pct(t.map):>11}" + (f"  {_pct(t.top1):>12}" if single else "")
            lines.append(row)
        lines.append(
            f"{self.backbone}, {self.pool} features; trained on {self.train_split} ({self.train_images} images), "
            f"scored on {self.val_split} ({self.val_images} images)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("recipe", "backbone", "pool", "train_split", "val_split", "train_images", "val_images", "methods")
        }
        out["stages"] = [
            {
                "stage": r.stage,
                "dim": r.dim,
                "stride": r.stride,
                "receptive_field": r.receptive_field,
                "methods": {
                    m: {**r.tables[m].to_dict(), "C": [None if np.isnan(c) else c for c in r.cs[m]]}
                    for m in self.methods
                },
            }
            for r in self.results
        ]
        return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def layer_study(
    recipe: Recipe,
    train_split: str,
    val_split: str,
    pool: str = "whole",
    methods=METHODS,
    grid=C_GRID,
    progress: bool = True,
) -> LayerStudy:
    """Fit each method on every stage's vectors of ``train_split`` and score ``val_split``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PatchnetError(f"--methods must name some of {', '.join(METHODS)}; got {', '.join(methods) or 'none'}")
    r = stage_recipe(recipe, pool)
    extractor = build_stage_extractor(r)
    train_ds = open_split(r.data, train_split)
    val_ds = open_split(r.data, val_split, classes=train_ds.classes)
    train_f = stage_features(r, train_ds, extractor, progress)
    val_f = stage_features(r, val_ds, extractor, progress)
    results = []
    bar = tqdm(total=len(extractor.stages) * len(methods), desc="linear per stage", unit="fit", disable=not progress)
    for s in extractor.stages:
        tables, cs = {}, {}
        for m in methods:
            model = fit_linear(train_f.split(s.name), m, grid, seed=r.train.seed, progress=False)
            tables[m] = ap_table(
                model.decision(val_f.features[s.name]), val_f.labels, val_f.classes, single_label=val_ds.single_label
            )
            cs[m] = model.cs
            bar.update(1)
        rf = stage_receptive_field(extractor.backbone, s).size
        results.append(LayerResult(s.name, s.dim, s.stride, rf, tables, cs))
    bar.close()
    return LayerStudy(
        r.name, r.backbone.name, pool, train_split, val_split, len(train_f.ids), len(val_f.ids), list(methods), results
    )


def write_study(study: LayerStudy, out: Path) -> tuple[Path, Path]:
    """``layers.json`` (every AP and chosen C) and ``layers.png`` (mAP against depth, one line per method)."""
    from ..outputs.figures import new_figure, plain, save_figure

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "layers.json", out / "layers.png"
    atomic_write(json_path, json.dumps(study.to_dict(), indent=1))
    x = np.arange(len(study.results))
    fig, axes = new_figure(figsize=(1.0 + 0.75 * len(x), 4.0))
    ax = axes[0, 0]
    for m in study.methods:
        ax.plot(x, [100 * r.tables[m].map07 for r in study.results], marker="o", label=m)
    ax.set_xticks(x, [f"{r.stage}\n/{r.stride}" for r in study.results], fontsize=8)
    ax.set_xlabel("stage (and its stride), shallow to deep")
    ax.set_ylabel("mAP, VOC07 11-point (%)")
    ax.set_title(
        plain(f"{study.backbone}, {study.pool} features: {study.train_split} -> {study.val_split}"), fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path)
    return json_path, png_path
