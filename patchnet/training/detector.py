"""Training the detection head (``train.detector: mil``, ``patchnet.head.mil``) on a split's cached trunk maps.

It runs after the classification head has trained: the detection head copies that head's FCa (frozen) and
trains WSDDN's streams and OICR's refinements from the image labels alone, a step on ``detector.image_batch``
images, SGD with momentum, the learning rate divided by 10 for the last third of the epochs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import Dataset
from ..dist import is_main
from ..errors import PatchnetError
from ..evaluation.localize import map_boxes
from ..features.extract import PatchExtractor
from ..head.layers import AdaptationHead
from ..head.mil import MILHead, mil_loss, store_regions
from ..recipe import DetectorConfig, Recipe
from ..store import CacheSpec
from .splits import Selection, SplitData
from .unlock import MapStore, build_maps

log = logging.getLogger("patchnet")


def detector_from_head(head: AdaptationHead, cfg: DetectorConfig) -> MILHead:
    """A detection head whose frozen FCa is the classification ``head``'s (its first member's)."""
    linear = cast(nn.Linear, head.fca[0])
    hidden = linear.out_features // head.members
    mil = MILHead(linear.in_features, head.num_classes, hidden, cfg.refinements, cfg.context)
    with torch.no_grad():
        mil.fca.weight.copy_(linear.weight[:hidden])
        mil.fca.bias.copy_(linear.bias[:hidden])
    return mil


def train_detector(
    mil: MILHead,
    store: MapStore,
    dataset: Dataset,
    items: np.ndarray,
    cfg: DetectorConfig,
    geometry: dict,
    seed: int = 0,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    seeds: dict[int, dict[int, np.ndarray]] | None = None,
) -> list[float]:
    """Train ``mil``'s streams on store ``items`` of ``dataset`` (their image labels); the mean loss of each epoch.

    ``geometry``: the trunk's ``stride``, ``offset`` and ``input_size`` (``image_regions``); ``dtype``: the
    autocast of the frozen FCa (None: fp32); ``seeds``: record -> class -> the first refinement's top box
    (``map_seeds``).
    """
    device = mil.cls.weight.device
    labels = torch.from_numpy(dataset.labels()[store.record[items]]).to(device)
    params = [p for p in mil.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    drop = max(1, math.ceil(cfg.epochs * 2 / 3))
    rng = np.random.default_rng(seed)
    history = []
    mil.train()
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (0.1 if epoch >= drop else 1.0)
        order = rng.permutation(len(items))
        total, bar = 0.0, tqdm(total=len(order), desc=f"detector {epoch + 1}/{cfg.epochs}", disable=not progress)
        for start in range(0, len(order), cfg.image_batch):
            batch = order[start : start + cfg.image_batch]
            loss = torch.zeros((), device=device)
            for row in batch:
                regions = store_regions(store, dataset, int(items[row]), cfg, geometry, device)
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                    hidden = mil.hidden(regions.maps, regions.cells)
                image_seeds = seeds.get(int(store.record[items[row]])) if seeds else None
                loss = loss + mil_loss(mil(hidden.float()), regions.boxes, labels[row], cfg.iou, image_seeds)
            loss = loss / len(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            bar.update(len(batch))
            bar.set_postfix(loss=f"{total / (bar.n or 1):.3f}")
        bar.close()
        history.append(total / max(len(order), 1))
        log.info("detector epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, history[-1])
    mil.eval()
    return history


def trunk_geometry(extractor: PatchExtractor) -> dict:
    """What maps a region onto a trunk map's cells: its stride and offset, and its input size."""
    b = extractor.backbone
    return {"stride": float(b.stride), "offset": float(b.offset), "input_size": int(extractor.size)}


def fit_detector(
    recipe: Recipe,
    head: AdaptationHead,
    extractor: PatchExtractor,
    spec: CacheSpec,
    dataset: Dataset,
    held_records: np.ndarray,
    progress: bool = True,
    features=None,
) -> dict | None:
    """``train.detector: mil``: the detection head trained from ``head`` on the trunk maps of ``dataset`` (cached
    first), its images outside ``held_records``; the checkpoint's ``detector`` field. Every rank builds its share
    of the maps; rank 0 trains and returns the field, the others None. ``features``: the split's patch feature
    store (``detector.seed: map`` reads the head's score maps from it)."""
    if extractor.backbone.roi_size:
        raise PatchnetError(
            f"train.detector=mil pools regions as means of the trunk's map; {extractor.backbone.name} pools "
            "them with RoIAlign into fully connected layers; use a convolutional backbone or train.detector: none"
        )
    store = build_maps(spec, dataset, extractor, None, progress=progress)
    if not is_main():
        return None
    items = np.flatnonzero((store.view == 0) & store.ok & ~np.isin(store.record, held_records))
    cfg, geometry = recipe.detector, trunk_geometry(extractor)
    torch.manual_seed(recipe.train.seed)
    mil = detector_from_head(head, cfg).to(extractor.device)
    started = time.perf_counter()
    seeds = None
    if cfg.seed == "map":  # the score map's boxes of the classification head, on the split's patch features
        seen = (features.view == 0) & features.ok & np.isin(features.record, store.record[items])
        seeds = map_seeds(head, features, dataset, np.flatnonzero(seen), recipe)
    dtype = extractor.autocast_dtype  # FCa is frozen: it runs at the trunk's precision
    history = train_detector(mil, store, dataset, items, cfg, geometry, recipe.train.seed, progress, dtype, seeds)
    log.info("detector: %d images, %d epochs in %.0f s", len(items), cfg.epochs, time.perf_counter() - started)
    return {"head": {k: v.cpu() for k, v in mil.state_dict().items()}, **geometry, "loss": history}


def map_seeds(head: AdaptationHead, store, dataset: Dataset, items: np.ndarray, recipe: Recipe) -> dict:
    """record -> class -> the score map's first box (``infer.box_threshold``, ``infer.map_prior``) of each class
    present, from the classification ``head`` on feature store ``items``: ``detector.seed: map``."""
    out: dict[int, dict[int, np.ndarray]] = {}
    pool = recipe.infer_pool
    for i in items:
        rec = dataset.records[store.record[i]]
        present = [int(c) for c in np.flatnonzero(rec.labels == 1)]
        found = map_boxes(head, store, int(i), rec.width, rec.height, present, pool, recipe.infer)
        out[int(store.record[i])] = {c: np.asarray(box, np.float32) for c, box in found.items()}
    return out


def add_detector(
    recipe: Recipe,
    head: AdaptationHead,
    extractor,
    spec,
    train_data: SplitData,
    selection: Selection | None,
    progress: bool,
) -> None:
    """``train.detector: mil``: the detection head, trained from the final head on the images it trained on, added
    to best.pt and last.pt (trained anew by a resumed run: it is quick and deterministic)."""
    held = np.zeros(0, np.int64)  # with data.select_split every training image trains the detector too
    if selection is not None and selection.data is train_data:
        held = train_data.store.record[selection.items]
    field = fit_detector(recipe, head, extractor, spec, train_data.dataset, held, progress, train_data.store)
    if field is not None:
        for name in ("last.pt", "best.pt"):
            path = recipe.run_dir / name
            if path.exists():
                save_checkpoint(replace(load_checkpoint(path), detector=field), path)
