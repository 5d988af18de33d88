"""Patch features of a split, computed once into the feature cache (``patchnet.cache``) and read from it after.

The trunk is frozen, so a patch's feature depends only on the image, the patch grid, the backbone and
its weights, the input size and the precision; the cache key is a hash of exactly those
(``cache_fields``), plus the storage codec (``cache.compress``, see ``patchnet.codec``) and its
projection when it has one. A PCA projection is fitted once on the training split
(``cache.pca_images`` images, a fixed seed) and kept in ``<cache_dir>/projections/``; every split of a
run, and every later evaluation through the checkpoint, which carries it, stores its rows through it.

Builds run in chunks of images (``fill_chunks``, shared with the map cache of ``patchnet.unlock``):
under ``torchrun`` the ranks compute disjoint chunks and rank 0 joins them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .cache import (
    CACHE_VERSION,
    CacheError,
    FeatureStore,
    building,
    chunk_path,
    complete,
    join_feature_chunks,
    ready,
    save_feature_chunk,
    save_projection,
    start_chunks,
    transcode,
)
from .codec import CodecError, FeatureCodec, Moments
from .datasets import Dataset, iter_images, open_split
from .dist import barrier, rank_world
from .extract import PatchExtractor
from .files import atomic_write, digest
from .recipe import AugConfig, CacheConfig, Recipe

log = logging.getLogger("patchnet")

PCA_SEED = 0  # draws the training images a projection is fitted on; fixed, so that runs share projections


@dataclass(frozen=True)
class CacheSpec:
    """What a cache build needs of a run: where caches live, how they are chunked and stored, how images are
    decoded, and what makes the augmented views."""

    root: Path
    chunk: int = 32  # images per chunk file: a killed build loses at most one chunk of work
    workers: int = 2
    codec: FeatureCodec = field(default_factory=FeatureCodec)
    aug: AugConfig = field(default_factory=AugConfig)
    seed: int = 0


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
    path = spec.root / digest(cache_fields(dataset, extractor, views, spec))
    return FeatureStore(path) if complete(path) else None


def build_features(
    spec: CacheSpec, dataset: Dataset, extractor: PatchExtractor, views: int = 0, progress: bool = True
) -> FeatureStore:
    """Open the cached features of a split, computing what is missing first.

    Items are every image (view 0) and, with ``views`` > 0, that many augmented views of each. A
    compressed cache is encoded from the split's fp16 cache when that exists, without running the trunk.
    """
    fields = cache_fields(dataset, extractor, views, spec)
    path = spec.root / digest(fields)
    if ready(path):
        return FeatureStore(path)
    with building(path, f"feature cache {path.name}"):
        if not complete(path):  # another process may have built it while this one waited
            _build_features(spec, dataset, extractor, views, fields, path, progress)
    return FeatureStore(path)


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
        if rank_world()[0] == 0:
            log.info("feature cache %s: encoding the fp16 cache %s as %s", path.name, source.path.name, codec.compress)
            transcode(source, codec, path, {**meta, "items": len(source), "chunk": spec.chunk})
        barrier()
        return
    layout = codec.layout(extractor.feature_dim)

    def compute(image: torch.Tensor):
        features, plan = extractor.extract(image)
        return codec.encode(features), plan.boxes

    def write(target: Path, results: list) -> None:
        save_feature_chunk(target, [(None, None, info) if r is None else (*r, info) for r, info in results], layout)

    if rank_world()[0] == 0:
        save_projection(path, codec)
    num_chunks = fill_chunks(
        path,
        meta,
        dataset,
        views,
        spec,
        extractor.device,
        compute,
        write,
        f"features {dataset.name.rsplit(':', 1)[-1]}",
        progress,
        stored=_cached_originals(spec, dataset, extractor, path) if views else None,
    )
    if rank_world()[0] == 0:
        join_feature_chunks(path, num_chunks, layout)


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
    if rank_world()[0] == 0:
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


def fill_chunks(
    path: Path,
    meta: dict,
    dataset: Dataset,
    views: int,
    spec: CacheSpec,
    device: torch.device,
    compute: Callable[[torch.Tensor], object],
    write: Callable[[Path, list], None],
    desc: str,
    progress: bool,
    stored: Callable[[int, int], tuple | None] | None = None,
) -> int:
    """Compute this rank's missing chunks of a build and write each as soon as its items are done.

    Items are ``(record, view)`` pairs, ``spec.chunk`` to a chunk; ``compute(image)`` gives an item's
    result, and ``write(target, [(result or None, objects or failure message), ...])`` stores a
    chunk. ``stored(record, view)``, when given, returns such a pair for an item another cache already
    holds (it is copied, not decoded), or None. Returns the number of chunks; when it returns every
    rank's chunks exist.
    """
    rank, _ = rank_world()
    items = [(r, v) for r in range(len(dataset.records)) for v in range(views + 1)]
    chunks = [items[i : i + spec.chunk] for i in range(0, len(items), spec.chunk)]
    todo = start_chunks(path, {**meta, "items": len(items), "chunk": spec.chunk}, len(chunks))
    pending: dict[int, list] = {c: [None] * len(chunks[c]) for c in todo}
    left = {c: len(chunks[c]) for c in todo}  # items of each chunk not yet done
    flat = []  # (chunk, position in it, item) of the items to decode
    for c in todo:
        for pos, item in enumerate(chunks[c]):
            copied = stored(*item) if stored is not None else None
            if copied is None:
                flat.append((c, pos, item))
            else:
                pending[c][pos], left[c] = copied, left[c] - 1
        if not left[c]:
            write(chunk_path(path, c), pending.pop(c))
    for i, image, info in iter_images(
        dataset.records,
        [item for _, _, item in flat],
        aug=spec.aug,
        seed=spec.seed,
        workers=spec.workers,
        device=device,
        desc=desc,
        progress=progress and rank == 0,
        keep_failures=True,
    ):
        c, pos, _ = flat[i]
        pending[c][pos], left[c] = (None if image is None else compute(image), info), left[c] - 1
        if not left[c]:
            write(chunk_path(path, c), pending.pop(c))
    barrier()
    return len(chunks)


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
    key = digest(fields)
    path = spec.root / "projections" / f"{key}.npz"
    if not path.is_file() or rank_world()[1] > 1:  # under torchrun every rank enters, to decide together
        with building(spec.root / f"projection-{key}", f"PCA projection {key}"):
            if rank_world()[0] == 0 and not path.is_file():
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
    with np.load(path) as z:
        return FeatureCodec(cfg.compress, z["mean"], z["components"])


def calibrate_extractor(recipe: Recipe, extractor: PatchExtractor, train: Dataset, progress: bool = True) -> None:
    """Calibrate an int8 extractor on ``backbone.int8_images`` training images (a fixed draw, every pyramid level),
    once: the activation ranges are kept in ``<cache_dir>/int8/``, keyed by the images, backbone and patches."""
    fields = {
        "images": train.images_digest,
        "backbone": extractor.backbone.name,
        "weights": extractor.backbone.weights_id,
        "patches": dataclasses.asdict(extractor.patches),
        "int8_images": recipe.backbone.int8_images,
        "seed": PCA_SEED,
    }
    path = Path(recipe.runtime.cache_dir) / "int8" / f"{digest(fields)}.json"
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
    if rank_world()[0] == 0:
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
