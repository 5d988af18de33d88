"""A split ready to train or choose on: its dataset, its cached features (or maps) and the label of every patch,
and the training images held out to choose ``best.pt`` on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..backbones import backbone_spec, unlock_split
from ..checkpoint import Checkpoint, CheckpointError, DataFingerprint, check_same_data
from ..data import Dataset, DatasetError, open_split
from ..dist import get_world_size
from ..evaluation.scoring import evaluation_items
from ..features.build import build_features, cache_spec
from ..features.extract import PatchExtractor
from ..patches.labels import IGNORE, MULTI, label_patches
from ..recipe import Recipe
from ..store import CacheSpec, FeatureStore
from ..store.codec import FeatureCodec
from .unlock import MapStore, build_maps

log = logging.getLogger("patchnet")


@dataclass
class SplitData:
    """A split with its cached features and the training label of every cached patch."""

    dataset: Dataset
    store: FeatureStore | MapStore  # a MapStore with train.unlock
    labels: np.ndarray  # (P,) int64: class, C for background, IGNORE, or MULTI
    multi_rows: np.ndarray  # (M,) sorted patch indices labelled MULTI
    multi_targets: np.ndarray  # (M, C) bool: their classes

    def image_labels(self, items: np.ndarray) -> np.ndarray:
        return self.dataset.labels()[self.store.record[items]]


@dataclass
class Selection:
    """The images ``best.pt`` is chosen on (and the fusion and calibration fitted on): store ``items`` of ``data``,
    held-out training images or ``data.select_split``."""

    data: SplitData
    items: np.ndarray

    def labels(self) -> np.ndarray:
        return self.data.image_labels(self.items)


def patch_labels(store: FeatureStore | MapStore, dataset: Dataset, multilabel: bool = False):
    """Labels of all cached patches (view 0: the annotations; augmented views: their own boxes).

    Returns ``(labels, multi_rows, multi_targets)``; the last two are empty without ``multilabel``.
    """
    num_classes = len(dataset.classes)
    labels = np.full(store.num_patches, IGNORE, np.int64)
    rows, targets = [], []
    for i in range(len(store)):
        if not store.ok[i]:
            continue
        rec = dataset.records[store.record[i]]
        objects: tuple[np.ndarray, np.ndarray, np.ndarray] = (
            (rec.boxes, rec.box_classes, rec.box_difficult) if store.view[i] == 0 else store.item_objects(i)
        )
        s = store.item_slice(i)
        out = label_patches(store.patch_boxes[s], *objects, num_classes, image_labels=rec.labels, multilabel=multilabel)
        if multilabel:
            out, t = out
            multi = np.flatnonzero(out == MULTI)
            rows.append(multi + s.start)
            targets.append(t[multi])
        labels[s] = out
    if rows:
        return labels, np.concatenate(rows), np.concatenate(targets)
    return labels, np.zeros(0, np.int64), np.zeros((0, num_classes), bool)


def prepare_split(
    recipe: Recipe,
    split: str,
    extractor: PatchExtractor,
    spec: CacheSpec,
    views: int = 0,
    progress: bool = True,
    classes: list[str] | None = None,
    dataset: Dataset | None = None,
) -> SplitData:
    """Open a split (or take ``dataset``), build (or reuse) its cache in ``spec``, and label its patches where
    boxes are used. With ``train.unlock`` the cache holds the maps below the unlocked stages instead.

    ``classes``: the class list to read the split with (the training split's, for the other splits).
    """
    dataset = dataset or open_split(recipe.data, split, classes)
    if recipe.train.supervision != "images" and not dataset.has_boxes:
        raise DatasetError(
            f"{dataset.name} has no boxes, so train.supervision={recipe.train.supervision} has no "
            "patch labels; use --set train.supervision=images to learn from image labels alone"
        )
    store: FeatureStore | MapStore
    if recipe.train.unlock:
        unlock = unlock_split(backbone_spec(recipe.backbone.name), recipe.train.unlock)
        store = build_maps(spec, dataset, extractor, unlock, views=views, progress=progress)
    else:
        store = build_features(spec, dataset, extractor, views=views, progress=progress)
    if recipe.train.supervision == "images":
        c = len(dataset.classes)
        return SplitData(
            dataset, store, np.full(store.num_patches, IGNORE, np.int64), np.zeros(0, np.int64), np.zeros((0, c), bool)
        )
    return SplitData(dataset, store, *patch_labels(store, dataset, recipe.train.multilabel))


def holdout_records(num_records: int, fraction: float, seed: int) -> np.ndarray:
    """The training records held out to choose best.pt on: a fixed random ``fraction`` of them."""
    n = int(round(fraction * num_records))
    if fraction > 0 and num_records > 1:
        n = min(max(n, 1), num_records - 1)
    return np.sort(np.random.default_rng([seed, 7919]).permutation(num_records)[:n])


def held_out(train_data: SplitData, selection: Selection | None) -> np.ndarray:
    """(items,) bool: the store items of held-out training images, every augmented view included."""
    store = train_data.store
    if selection is None or selection.data is not train_data:
        return np.zeros(len(store), bool)
    return np.isin(store.record, store.record[selection.items])


def selection_split(
    recipe: Recipe, train_data: SplitData, extractor: PatchExtractor, spec: CacheSpec, progress: bool = True
) -> Selection | None:
    """The images best.pt is chosen on: ``data.select_split``, else ``train.holdout`` of the training images."""
    if recipe.data.select_split:
        if recipe.data.select_split == recipe.data.val_split:
            raise CheckpointError(
                f"data.select_split and data.val_split are both {recipe.data.val_split!r}: a "
                "checkpoint chosen on the reported split overstates it; choose on another split "
                "or leave select_split empty to hold out train.holdout of the training images"
            )
        data = prepare_split(
            recipe, recipe.data.select_split, extractor, spec, progress=progress, classes=train_data.dataset.classes
        )
        return Selection(data, evaluation_items(data.store))
    if recipe.train.holdout <= 0:
        return None
    held = holdout_records(len(train_data.dataset), recipe.train.holdout, recipe.train.seed)
    return Selection(train_data, evaluation_items(train_data.store, held))


def log_split(name: str, data: SplitData, selection: Selection | None) -> None:
    c = len(data.dataset.classes)
    counts = np.bincount(np.where(data.labels < 0, c + 1, data.labels), minlength=c + 2)
    held = (
        f"; {len(selection.items)} images held out to choose best.pt"
        if selection is not None and selection.data is data
        else ""
    )
    log.info(
        "%s: %d images, %d patches: %d positive, %d background, %d ignored or multi-label%s",
        name,
        len(data.dataset),
        len(data.labels),
        counts[:c].sum(),
        counts[c],
        counts[c + 1],
        held,
    )


def run_splits(
    recipe: Recipe, extractor: PatchExtractor, saved: Checkpoint | None, progress: bool, datasets: dict[str, Dataset]
):
    """A training run's splits: the training split, the selection images, the validation split (or None), the
    cache they are in, and the fingerprint of the training data (checked against a resumed run's first)."""
    # a resumed run keeps the projection its head was trained on; unlock stores its maps as they are
    codec = FeatureCodec.from_state(saved.codec) if saved is not None else None
    if saved is not None and saved.int8 and extractor.int8:  # and the int8 trunk
        extractor.use_int8(saved.int8)
    train_set = datasets.get(recipe.data.train_split) or open_split(recipe.data, recipe.data.train_split)
    data = DataFingerprint.of(recipe.data.root, train_set.records, train_set.classes, get_world_size())
    if saved is not None:
        check_same_data(saved.data, data, recipe.run_dir / "last.pt")
    spec = cache_spec(recipe, extractor, train_set, FeatureCodec() if recipe.train.unlock else codec, progress)
    train_data = prepare_split(
        recipe, recipe.data.train_split, extractor, spec, views=recipe.aug.views, progress=progress, dataset=train_set
    )
    selection = selection_split(recipe, train_data, extractor, spec, progress)
    log_split("train", train_data, selection)
    val = None
    if recipe.data.val_split:
        val = prepare_split(
            recipe,
            recipe.data.val_split,
            extractor,
            spec,
            progress=progress,
            classes=train_data.dataset.classes,
            dataset=datasets.get(recipe.data.val_split),
        )
    return train_data, selection, val, spec, data
