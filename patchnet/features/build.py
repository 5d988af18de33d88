"""Patch features of a split, computed once into the feature cache (``patchnet.store``) and read from it after.

The trunk is frozen, so a patch's feature depends only on the image, the patch grid, the backbone and
its weights, the input size and the precision; the cache key is a hash of exactly those
(``cache_fields``), plus the storage codec (``cache.compress``, see ``patchnet.store.codec``) and its
projection when it has one. A PCA projection is fitted once on the training split
(``cache.pca_images`` images, a fixed seed) and kept in ``<cache_dir>/projections/``; every split of a
run, and every later evaluation through the checkpoint, which carries it, stores its rows through it.

Builds run in chunks of images (``patchnet.store.fill_chunks``, as every cache does): under ``torchrun``
the ranks compute disjoint chunks and rank 0 joins them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data import Dataset, iter_images, open_split
from ..dist import barrier, get_world_size, is_main
from ..files import atomic_write
from ..recipe import CacheConfig, Recipe
from ..store import (
    CACHE_VERSION,
    UNREADABLE,
    CacheError,
    CacheSpec,
    FeatureStore,
    building,
    complete,
    fill_chunks,
    join_chunks,
    keyed_file,
    keyed_folder,
    open_or_build,
    save_projection,
    transcode,
)
from ..store.codec import CodecError, FeatureCodec, Moments
from .extract import PatchExtractor

log = logging.getLogger("patchnet")

PCA_SEED = 0  # draws the training images a projection is fitted on; fixed, so that runs share projections


def cache_spec(
    recipe: Recipe,
    extractor: PatchExtractor,
    train: Dataset | None = None,
    codec: FeatureCodec | None = None,
    progress: bool = True,
) -> CacheSpec:
    """The feature cache of a recipe. Its rows are stored as ``codec``, by default as ``cache.compress`` says (a
    PCA projection fitted on ``train``, the training split, opened if not given). An int8 extractor not yet
    calibrated is calibrated on ``train`` first (``calibrate_extractor``)."""
    if extractor.int8 and extractor.int8_ranges is None:
        calibrate_extractor(recipe, extractor, train or open_split(recipe.data, recipe.data.train_split), progress)
    spec = CacheSpec(
        Path(recipe.runtime.cache_dir),
        max(1, recipe.cache.chunk),
        recipe.runtime.workers,
        FeatureCodec(),
        recipe.aug,
        recipe.train.seed,
    )
    if codec is None and recipe.cache.compress.startswith("pca"):
        train = train or open_split(recipe.data, recipe.data.train_split)
        codec = fit_codec(recipe.cache, spec, train, extractor, progress)
    return replace(spec, codec=codec or FeatureCodec(recipe.cache.compress))


def cache_fields(dataset: Dataset, extractor: PatchExtractor, views: int = 0, spec: CacheSpec | None = None) -> dict:
    """Everything the cached features of a split depend on; any change gives another key."""
    spec = spec or CacheSpec(Path("."))
    fields = {
        "version": CACHE_VERSION,
        "images": dataset.images_digest,  # resolved paths: a relative and an absolute root share one cache
        "patches": dataclasses.asdict(extractor.patches),
        "backbone": extractor.backbone.name,
        "weights": extractor.backbone.weights_id,
        "input_size": extractor.size,
        "precision": extractor.precision_id,
        "views": views,
    }
    if views:  # augmented views carry their own (transformed) boxes, so they depend on the annotations too
        fields.update(aug=dataclasses.asdict(spec.aug), seed=spec.seed, annotations=dataset.annotations_digest)
    return {**fields, **spec.codec.fields()}


def cached_features(
    spec: CacheSpec, dataset: Dataset, extractor: PatchExtractor, views: int = 0
) -> FeatureStore | None:
    """The complete cache of a split if one exists (a warm cache), without extracting it."""
    path = keyed_folder(spec.root, cache_fields(dataset, extractor, views, spec))
    return FeatureStore(path) if complete(path) else None


def build_features(
    spec: CacheSpec, dataset: Dataset, extractor: PatchExtractor, views: int = 0, progress: bool = True
) -> FeatureStore:
    """Open the cached features of a split, computing what is missing first.

    Items are every image (view 0) and, with ``views`` > 0, that many augmented views of each. A
    compressed cache is encoded from the split's fp16 cache when that exists, without running the trunk.
    """
    fields = cache_fields(dataset, extractor, views, spec)
    path = keyed_folder(spec.root, fields)
    return open_or_build(
        path,
        "feature cache",
        lambda: _build_features(spec, dataset, extractor, views, fields, path, progress),
        FeatureStore,
    )


def _build_features(
    spec: CacheSpec, dataset: Dataset, extractor: PatchExtractor, views: int, fields: dict, path: Path, progress: bool
) -> None:
    codec = spec.codec
    meta = {"fields": fields, "feature_dim": codec.dim(extractor.feature_dim), "compress": codec.compress}
    source = (
        cached_features(replace(spec, codec=FeatureCodec()), dataset, extractor, views)
        if codec.compress != "none"
        else None
    )
    if source is not None:
        if is_main():
            log.info("feature cache %s: encoding the fp16 cache %s as %s", path.name, source.path.name, codec.compress)
            transcode(source, codec, path, {**meta, "items": len(source), "chunk": spec.chunk})
        barrier()
        return
    layout = codec.layout(extractor.feature_dim)

    def compute(image: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
        features, plan = extractor.extract(image)
        return codec.encode(features), plan.boxes

    def pack(payloads: list) -> dict[str, np.ndarray]:
        done = [f for f in payloads if f is not None]
        return {
            name: np.concatenate([f[name] for f in done]) if done else np.zeros((0, width), dtype)
            for name, (dtype, width) in layout.items()
        }

    if is_main():
        save_projection(path, codec)
    num_chunks = fill_chunks(
        path,
        meta,
        dataset,
        views,
        spec,
        extractor.device,
        compute,
        pack,
        f"features {dataset.name.rsplit(':', 1)[-1]}",
        progress,
        stored=_cached_originals(spec, dataset, extractor, path) if views else None,
    )
    if is_main():
        join_chunks(path, num_chunks, layout, "feature cache")


def _cached_originals(
    spec: CacheSpec, dataset: Dataset, extractor: PatchExtractor, path: Path
) -> Callable[[int, int], tuple | None] | None:
    """``fill_chunks``'s ``stored`` for a build with augmented views: the original images (view 0) from the
    split's cache without views, when a complete one exists, so that they are copied, not extracted again."""
    try:
        originals = cached_features(spec, dataset, extractor)
    except CacheError as e:  # a damaged cache is rebuilt when its own run needs it; this build extracts instead
        log.warning("%s; extracting the original images again", e)
        return None
    if originals is None:
        return None
    if is_main():
        log.info("feature cache %s: copying the original images from %s", path.name, originals.path.name)

    def stored(record: int, view: int) -> tuple | None:
        if view:
            return None
        item = originals.stored_item(record)
        if isinstance(item, str):
            return None, item
        rec = dataset.records[record]  # view 0's objects are the annotations, as decoding gives them
        return item, (rec.boxes, rec.box_classes, rec.box_difficult)

    return stored


def fit_codec(
    cfg: CacheConfig, spec: CacheSpec, train: Dataset, extractor: PatchExtractor, progress: bool = True
) -> FeatureCodec:
    """``cache.compress`` with its PCA projection, fitted once on ``cache.pca_images`` images of the training
    split (drawn with a fixed seed; all their patches) and kept in ``<cache_dir>/projections/``, keyed by
    the training split's features and the PCA settings, so that every split and every run shares it."""
    if not cfg.compress.startswith("pca"):
        return FeatureCodec(cfg.compress)
    if cfg.pca_dim > extractor.feature_dim:
        raise CodecError(
            f"cache.pca_dim={cfg.pca_dim} exceeds the {extractor.feature_dim}-d features of "
            f"{extractor.backbone.name}; choose at most {extractor.feature_dim}"
        )
    fp16 = replace(spec, codec=FeatureCodec())
    fields = {
        "features": cache_fields(train, extractor, 0, fp16),
        "pca_dim": cfg.pca_dim,
        "pca_images": cfg.pca_images,
        "seed": PCA_SEED,
    }
    path = keyed_file(spec.root, "projections", fields, ".npz")
    key = path.stem
    if not path.is_file() or get_world_size() > 1:  # under torchrun every rank enters, to decide together
        with building(spec.root / f"projection-{key}", f"PCA projection {key}"):
            if is_main() and not path.is_file():
                moments = Moments(extractor.feature_dim)
                for rows in _projection_sample(cfg, fp16, train, extractor, progress):
                    moments.add(rows)
                mean, components, kept = moments.pca(cfg.pca_dim)
                log.info(
                    "PCA projection on %d patches of %s: %d components keep %.1f%% of the variance",
                    moments.n,
                    train.name,
                    cfg.pca_dim,
                    100 * kept,
                )
                atomic_write(
                    path,
                    lambda f: np.savez(
                        f,
                        mean=mean.astype(np.float32),
                        kept=kept,
                        components=components.astype(np.float32),
                        patches=moments.n,
                        fields=json.dumps(fields),
                    ),
                )
    try:
        with np.load(path) as z:
            return FeatureCodec(cfg.compress, z["mean"], z["components"])
    except UNREADABLE as e:  # torn or edited after it was written
        raise CacheError(
            f"the PCA projection {path} cannot be read ({type(e).__name__}: {e}). Delete it (rm {path}); "
            "the next run fits it again"
        ) from None


def calibration_fields(recipe: Recipe, extractor: PatchExtractor, train: Dataset) -> dict:
    """What the int8 activation ranges depend on: the images drawn, the trunk and its weights, the patches and
    the input size they are resized to (the activations' range changes with it)."""
    return {
        "images": train.images_digest,
        "backbone": extractor.backbone.name,
        "weights": extractor.backbone.weights_id,
        "patches": dataclasses.asdict(extractor.patches),
        "input_size": extractor.size,
        "int8_images": recipe.backbone.int8_images,
        "seed": PCA_SEED,
    }


def calibrate_extractor(recipe: Recipe, extractor: PatchExtractor, train: Dataset, progress: bool = True) -> None:
    """Calibrate an int8 extractor on ``backbone.int8_images`` training images (a fixed draw, every pyramid level),
    once: the activation ranges are kept in ``<cache_dir>/int8/``, keyed by ``calibration_fields``."""
    fields = calibration_fields(recipe, extractor, train)
    path = keyed_file(Path(recipe.runtime.cache_dir), "int8", fields, ".json")
    if path.is_file():
        try:
            extractor.use_int8(json.loads(path.read_text())["ranges"])
            return
        except (ValueError, KeyError, TypeError) as e:  # a damaged file: calibrate again and replace it
            log.warning("%s is unreadable (%s); calibrating the int8 trunk again", path, e)
    n = min(recipe.backbone.int8_images, len(train.records))
    chosen = np.sort(np.random.default_rng(PCA_SEED).permutation(len(train.records))[:n])
    items = [(int(r), 0) for r in chosen]
    images = iter_images(train.records, items, device=extractor.device, desc="int8 calibration", progress=progress)
    ranges = extractor.calibrate(image for _, image, _ in images)
    log.info("int8 trunk calibrated on %d images of %s", n, train.name)
    if is_main():
        atomic_write(path, json.dumps({"ranges": ranges, "fields": fields}))


def _projection_sample(cfg: CacheConfig, fp16: CacheSpec, train: Dataset, extractor: PatchExtractor, progress: bool):
    """fp16 features of all patches of ``cache.pca_images`` training images (a fixed draw), image by image.

    Read from the split's fp16 cache when it exists, else extracted (the same rows either way).
    """
    chosen = np.sort(np.random.default_rng(PCA_SEED).permutation(len(train.records))[: cfg.pca_images])
    warm = cached_features(fp16, train, extractor)
    if warm is not None:
        for i in np.flatnonzero(np.isin(warm.record, chosen) & (warm.view == 0)):
            yield warm.rows[warm.item_slice(i)]
        return
    for _, image, _ in iter_images(
        train.records,
        [(int(r), 0) for r in chosen],
        workers=fp16.workers,
        device=extractor.device,
        desc="PCA sample",
        progress=progress,
    ):
        yield extractor(image).numpy().astype(np.float16).astype(np.float32)
