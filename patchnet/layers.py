"""Per-layer transfer: how well each depth of the frozen trunk serves a linear classifier.

The stages of a backbone (``BackboneSpec.stages``: the ends of its blocks, then its feature; for
AlexNet and VGG conv1..conv5, FC6 and FC7, the DeCAF analogue) all come from one trunk pass per
image. Each stage's map becomes one vector per image:
- ``whole``: its mean over the whole map, for the image and its mirror image, averaged (the
  whole-image features of ``patchnet linear``; FC6/FC7 from the RoI grid of the last map);
- ``max``: its mean over each patch of the recipe's grid (shared mode, the recipe's levels),
  max-pooled over the patches of the image (the box-free ``--pool max`` baseline).
The vectors of a split are cached on disk, one ``.npy`` per stage, keyed by everything they depend
on. On each stage a linear SVM and/or logistic regression is fit per class (``patchnet.linear``, C
by cross-validation on the training split) and scored on the other split by VOC AP.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .backbones import Backbone, build_backbone
from .cache import ItemImages, _digest, building, cache_fields
from .datasets import Dataset, open_split
from .errors import PatchnetError
from .extract import PatchExtractor
from .files import atomic_write
from .linear import C_GRID, SplitFeatures, fit_linear, whole_image_recipe
from .metrics import APTable, ap_table
from .recipe import Recipe

log = logging.getLogger("patchnet")

LAYERS_VERSION = 1  # bump whenever what a stage vector holds changes
POOLS = ("whole", "max")
METHODS = ("svm", "logreg")


class StageExtractor(PatchExtractor):
    """One vector per stage of the backbone for an image, from one trunk pass (per image and mirror, or per level).

    The trunk stays unfused: stage maps are caught by forward hooks, which an FX-fused trunk lacks.
    """

    def __init__(self, backbone: Backbone, recipe: Recipe):
        super().__init__(backbone, recipe.patches, recipe.backbone, recipe.runtime.device, recipe.runtime.trunk_batch,
                         fuse=False)
        self.stages = self.backbone.stages

    def whole_maps(self, img: torch.Tensor, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], tuple]:
        """Stage maps of a (1, 3, H, W) image rescaled as in whole mode, and (fx, fy): input pixels per image pixel."""
        h, w = img.shape[-2:]
        scaled = self._rescale(img, self.whole_factor(w, h))
        with self._autocast():
            maps = self.backbone.stage_maps(scaled, names)
        return maps, (scaled.shape[-1] / w, scaled.shape[-2] / h)

    @torch.inference_mode()
    def image_maps(self, image, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], tuple]:
        """``whole_maps`` of a uint8 (H, W, 3) array or (3, H, W) tensor."""
        return self.whole_maps(self._prepare(image), names)

    @torch.inference_mode()
    def __call__(self, image) -> dict[str, torch.Tensor]:
        """{stage: (dim,) float32 vector on the CPU} of a uint8 (H, W, 3) array or (3, H, W) tensor."""
        img = self._prepare(image)
        if self.patches.mode == "whole":
            a, b = self._whole_vectors(img), self._whole_vectors(img.flip(-1))
            return {k: ((a[k] + b[k]) / 2).cpu() for k in a}
        return {k: v.cpu() for k, v in self._max_vectors(img).items()}

    def _whole_vectors(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        maps, _ = self.whole_maps(img)
        out = {}
        with self._autocast():
            for s in self.stages:
                m = maps[s.name]
                cells = torch.tensor([[0.0, 0.0, m.shape[-1], m.shape[-2]]], device=self.device)
                out[s.name] = self.backbone.pool_stage(s, m, cells)[0].float()
        return out

    def _max_vectors(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stage's mean over every patch (shared mode, per pyramid level), max-pooled over the patches."""
        h, w = img.shape[-2:]
        grids = self.grids(w, h)
        best: dict[str, torch.Tensor] = {}
        for level in self.levels(grids, w, h):
            scaled = self._rescale(img, level.factor)
            with self._autocast():
                maps = self.backbone.stage_maps(scaled)
            fx, fy = scaled.shape[-1] / w, scaled.shape[-2] / h
            boxes = torch.from_numpy(np.concatenate([grids[i].boxes for i in level.grids])).to(self.device,
                                                                                                torch.float32)
            boxes = boxes * torch.tensor([fx, fy, fx, fy], device=self.device)
            for s in self.stages:
                # the trunk's output carries the backbone's cell offset (AlexNet); inner maps are taken unshifted
                offset = 0.0 if s.module else self.backbone.offset
                with self._autocast():
                    v = self.backbone.pool_stage(s, maps[s.name], (boxes - offset) / s.stride).float().amax(0)
                best[s.name] = v if s.name not in best else torch.maximum(best[s.name], v)
        return best


def stage_recipe(recipe: Recipe, pool: str) -> Recipe:
    """The recipe whose patch settings give ``pool``: whole images, or shared mode over its levels."""
    if pool not in POOLS:
        raise PatchnetError(f"--pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if pool == "whole":
        return whole_image_recipe(recipe)
    return replace(recipe, patches=replace(recipe.patches, mode="shared", exact_up_to=0.0))


def build_stage_extractor(recipe: Recipe) -> StageExtractor:
    """The recipe's backbone with its whole head (every stage up to FC7), unfused, on the recipe's device."""
    b = recipe.backbone
    return StageExtractor(build_backbone(b.name, b.weights, b.input_size), recipe)


@dataclass
class StageFeatures:
    """One row per readable image of a split for every stage, with image-level labels."""

    ids: list[str]
    labels: np.ndarray  # (N, C) int8
    classes: list[str]
    features: dict[str, np.ndarray]  # stage -> (N, dim) float32

    def split(self, stage: str) -> SplitFeatures:
        return SplitFeatures(self.ids, self.features[stage], self.labels, self.classes)


def stage_cache_key(recipe: Recipe, dataset: Dataset, extractor: StageExtractor) -> tuple[Path, dict]:
    """The cache folder of a split's stage vectors and its key's fields: the feature cache's, and the stages."""
    fields = {**cache_fields(recipe, dataset, extractor), "study": "layers", "layers_version": LAYERS_VERSION,
              "stages": [(s.name, s.module, s.head) for s in extractor.stages]}
    return Path(recipe.runtime.cache_dir) / "layers" / _digest(fields), fields


def stage_features(recipe: Recipe, dataset: Dataset, extractor: StageExtractor, progress: bool = True) -> StageFeatures:
    """The stage vectors of a split, from the cache or computed there first (``meta.json``, written last, marks it done)."""
    path, fields = stage_cache_key(recipe, dataset, extractor)
    if not (path / "meta.json").is_file():
        with building(path, f"stage cache {path.name}"):
            if not (path / "meta.json").is_file():  # another process may have written it while this one waited
                _compute_stage_features(recipe, dataset, extractor, path, fields, progress)
    meta = json.loads((path / "meta.json").read_text())
    records = np.asarray(meta["records"], np.int64)
    features = {s: np.load(path / f"{s}.npy") for s in meta["stages"]}
    return StageFeatures([dataset.records[r].image_id for r in records], dataset.labels()[records],
                         list(dataset.classes), features)


def _compute_stage_features(recipe, dataset, extractor, path: Path, fields: dict, progress: bool) -> None:
    source = ItemImages(dataset.records, [(r, 0) for r in range(len(dataset.records))])
    workers = recipe.runtime.workers
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    rows: dict[str, list[np.ndarray]] = {s.name: [] for s in extractor.stages}
    records, failures = [], []
    for i, image, info in tqdm(loader, total=len(source), desc=f"stages {dataset.name.rsplit(':', 1)[-1]}", unit="img",
                               disable=not progress, dynamic_ncols=True):
        if image is None:
            log.warning("skipped unreadable image: %s", info)
            failures.append(info)
            continue
        for name, v in extractor(image).items():
            rows[name].append(v.numpy())
        records.append(i)
    path.mkdir(parents=True, exist_ok=True)
    for s in extractor.stages:
        x = np.stack(rows[s.name]) if records else np.zeros((0, s.dim), np.float32)
        atomic_write(path / f"{s.name}.npy", lambda f: np.save(f, x.astype(np.float32)))
    meta = {"fields": fields, "stages": [s.name for s in extractor.stages],
            "records": records, "failures": failures}
    atomic_write(path / "meta.json", json.dumps(meta, indent=1))


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
        lines.append(f"{self.backbone}, {self.pool} features; trained on {self.train_split} ({self.train_images} images), "
                     f"scored on {self.val_split} ({self.val_images} images)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("recipe", "backbone", "pool", "train_split", "val_split", "train_images",
                                             "val_images", "methods")}
        out["stages"] = [{"stage": r.stage, "dim": r.dim, "stride": r.stride, "receptive_field": r.receptive_field,
                          "methods": {m: {**r.tables[m].to_dict(), "C": [None if np.isnan(c) else c for c in r.cs[m]]}
                                      for m in self.methods}}
                         for r in self.results]
        return out


def _pct(x: float) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def layer_study(recipe: Recipe, train_split: str, val_split: str, pool: str = "whole", methods=METHODS,
                grid=C_GRID, progress: bool = True) -> LayerStudy:
    """Fit each method on every stage's vectors of ``train_split`` and score ``val_split``."""
    from .units import stage_receptive_field

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PatchnetError(f"--methods must name some of {', '.join(METHODS)}; got {', '.join(methods) or 'none'}")
    r = stage_recipe(recipe, pool)
    extractor = build_stage_extractor(r)
    train_ds, val_ds = open_split(r.data, train_split), open_split(r.data, val_split)
    train_f = stage_features(r, train_ds, extractor, progress)
    val_f = stage_features(r, val_ds, extractor, progress)
    results = []
    bar = tqdm(total=len(extractor.stages) * len(methods), desc="linear per stage", unit="fit", disable=not progress)
    for s in extractor.stages:
        tables, cs = {}, {}
        for m in methods:
            model = fit_linear(train_f.split(s.name), m, grid, seed=r.train.seed, progress=False)
            tables[m] = ap_table(model.decision(val_f.features[s.name]), val_f.labels, val_f.classes,
                                 single_label=val_ds.single_label)
            cs[m] = model.cs
            bar.update(1)
        rf = stage_receptive_field(extractor.backbone, s).size
        results.append(LayerResult(s.name, s.dim, s.stride, rf, tables, cs))
    bar.close()
    return LayerStudy(r.name, r.backbone.name, pool, train_split, val_split, len(train_f.ids), len(val_f.ids),
                      list(methods), results)


def write_study(study: LayerStudy, out: Path) -> tuple[Path, Path]:
    """``layers.json`` (every AP and chosen C) and ``layers.png`` (mAP against depth, one line per method)."""
    from .figures import new_figure, plain, save_figure

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
    ax.set_title(plain(f"{study.backbone}, {study.pool} features: {study.train_split} -> {study.val_split}"),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path)
    return json_path, png_path
