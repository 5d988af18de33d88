"""On-disk feature cache: trunk features of every patch of every image (and augmented view).

The trunk is frozen, so a patch's feature depends only on the image, the patch grid, the backbone
and its weights, the input size and the precision; the cache key is a hash of exactly those, plus
the storage codec (``cache.compress``, see ``patchnet.codec``) and its projection when it has one.
Building writes chunks of images atomically, so a killed run resumes at the first missing chunk;
when all chunks exist they are joined into memory-mapped arrays (``features.f16``; or
``features.u8`` and ``scales.f32``). Readers go through ``FeatureStore.rows``, which decodes.

A PCA projection is fitted once on the training split (``cache.pca_images`` images, a fixed seed)
and kept in ``<cache_dir>/projections/``; every split of a run, and every later evaluation through
the checkpoint, which carries the projection, stores its rows through that same projection.

With ``train.unlock`` the last stages of the trunk train, so their features change at every step:
``build_maps`` caches instead each image's maps at the boundary below them (``MapStore``), from
which the unlocked stages compute the patch features on demand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset as TorchDataset
from tqdm.auto import tqdm

from .augment import augment, build_pipeline, view_seed
from .backbones import backbone_spec, unlock_split
from .codec import CodecError, FeatureCodec, Moments, decode_rows, stored_layout
from .datasets import Dataset, DatasetError, ImageRecord, load_image, open_split
from .errors import PatchnetError
from .files import atomic_write, file_crc, file_lock, temporary_name
from .extract import ImageMaps, PatchExtractor, UnlockedStages
from .recipe import AugConfig, Recipe

log = logging.getLogger("patchnet")

CACHE_VERSION = 2  # bump whenever the patch grid or feature code changes what is stored
PCA_SEED = 0  # draws the training images a projection is fitted on; fixed, so that runs share projections


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_fields(recipe: Recipe, dataset: Dataset, extractor: PatchExtractor, views: int = 0,
                 codec: FeatureCodec | None = None) -> dict:
    """Everything the cached features depend on (``codec``: how they are stored); any change gives another key."""
    # Resolved paths, so that a relative and an absolute dataset root share one cache.
    images = [(r.image_id, str(r.path.resolve()), r.path.stat().st_size, r.width, r.height) for r in dataset.records]
    p = recipe.patches
    fields = {
        "version": CACHE_VERSION,
        "images": _digest(images),
        "patches": dataclasses.asdict(p),
        "backbone": recipe.backbone.name,
        "weights": extractor.backbone.weights_id,
        "input_size": extractor.size,
        "precision": str(extractor.autocast_dtype or "fp32"),
        "views": views,
    }
    if views:
        # augmented views carry their own (transformed) boxes, so they depend on the annotations too
        fields["aug"] = dataclasses.asdict(recipe.aug)
        fields["seed"] = recipe.train.seed
        fields["annotations"] = _digest([(r.boxes.tolist(), r.box_classes.tolist(), r.box_difficult.tolist())
                                         for r in dataset.records])
    return {**fields, **(codec or FeatureCodec()).fields()}


class ItemImages(TorchDataset):
    """Decoded images of ``(record, view)`` items with their boxes; view 0 is the image itself."""

    def __init__(self, records: list[ImageRecord], items: list[tuple[int, int]], aug: AugConfig | None = None,
                 seed: int = 0):
        self.records, self.items, self.seed = records, items, seed
        self.pipeline = build_pipeline(aug) if aug is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        r, view = self.items[i]
        rec = self.records[r]
        try:
            image = load_image(rec.path)
        except DatasetError as e:
            return i, None, str(e)
        objects = (rec.boxes, rec.box_classes, rec.box_difficult)
        if view:
            image, *objects = augment(self.pipeline, image, *objects, seed=view_seed(self.seed, r, view))
        return i, torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), tuple(objects)


class Rows:
    """The (P, d) float32 feature rows of a store, decoded on read: ``rows[a:b]``, ``rows[index_array]``, ``rows[i]``.

    With a ``codec``, rows are mapped back through its projection (``FeatureCodec.unproject``).
    Functions that take a feature array (``patchnet.pooling``, ``AdaptationHead.logits``) take this too.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, features: np.ndarray, scales: np.ndarray | None = None, codec: FeatureCodec | None = None):
        self.stored, self.scales, self.codec = features, scales, codec
        self.shape = (len(features), features.shape[1] if codec is None else codec.components.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = decode_rows(self.stored[index], None if self.scales is None else self.scales[index])
        return rows if self.codec is None else self.codec.unproject(rows)


def _file(name: str, dtype: np.dtype) -> str:
    return f"{name}.{ {'float16': 'f16', 'uint8': 'u8', 'float32': 'f32'}[dtype.name]}"


class FeatureStore:
    """A complete cache, opened read-only: feature rows (P, d) memory-mapped, and per-item indexes.

    ``rows`` decodes the rows the head reads; ``feature_dim`` is their dimension (``cache.pca_dim``
    after a projection). ``trunk_rows`` maps them back to the trunk's space for features pooled by
    their maximum (the same view as ``rows`` without a projection).
    """

    def __init__(self, path: Path):
        self.path = path
        meta = open_checked(path)
        self.fields, self.feature_dim = meta["fields"], meta["feature_dim"]
        self.compress: str = meta.get("compress", "none")
        _load_index(self, path)
        total = int(self.offsets[-1])
        arrays = {name: _memmap(path, _file(name, dtype), dtype, (total, width))
                  for name, (dtype, width) in stored_layout(self.compress, self.feature_dim).items()}
        self.rows = Rows(**arrays)
        projection = {}
        if (path / "projection.npz").is_file():
            with _damaged_if_unreadable(path, "projection.npz"), np.load(path / "projection.npz") as z:
                projection = {"mean": z["mean"], "components": z["components"]}
        self.codec = FeatureCodec(self.compress, **projection)
        self.trunk_rows = self.rows if self.codec.components is None else Rows(**arrays, codec=self.codec)
        self.failures: list[str] = meta.get("failures", [])

    def __len__(self) -> int:
        return len(self.record)

    @property
    def num_patches(self) -> int:
        return int(self.offsets[-1])

    def item_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def item_objects(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        return self.boxes[s], self.box_classes[s], self.box_difficult[s]


# --------------------------------------------------------------------------- integrity


class CacheError(PatchnetError, RuntimeError):
    """A cache folder that is damaged or cannot be written; the message names it and how to rebuild it."""


def damaged(path: Path, problem: str) -> CacheError:
    return CacheError(f"cache {path} is damaged: {problem}. Delete the folder to rebuild it (rm -r {path}); the "
                      "next run recomputes it. `patchnet cache verify` checks every cache of a folder")


@contextlib.contextmanager
def _damaged_if_unreadable(path: Path, name: str):
    try:
        yield
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise damaged(path, f"{name} cannot be read ({type(e).__name__}: {e})") from None


def _read_meta(path: Path) -> dict:
    with _damaged_if_unreadable(path, "meta.json"):
        meta = json.loads((path / "meta.json").read_text())
    if not isinstance(meta, dict) or "fields" not in meta:
        raise damaged(path, "meta.json holds no cache description")
    return meta


def _load_index(store, path: Path) -> None:
    """Set every array of ``index.npz`` as an attribute of ``store``."""
    with _damaged_if_unreadable(path, "index.npz"), np.load(path / "index.npz") as idx:
        for name in idx.files:
            setattr(store, name, idx[name])


def _memmap(path: Path, name: str, dtype, shape: tuple[int, int]) -> np.ndarray:
    if not shape[0]:
        return np.zeros(shape, dtype)
    with _damaged_if_unreadable(path, name):
        return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)


def _boot_id() -> str:
    """An id of this boot of the machine (Linux), so that a cache is re-verified once after a crash."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def check_files(path: Path, meta: dict, checksums: bool = False) -> None:
    """Raise ``CacheError`` unless every file ``meta`` records has its size (and, with ``checksums``, its CRC-32)."""
    for name, info in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise damaged(path, f"{name} is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise damaged(path, f"{name} is {size} bytes, {info['size']} were written (truncated or replaced)")
        if checksums and file_crc(f) != info["crc32"]:
            raise damaged(path, f"{name} does not match its checksum (its bytes changed after it was written)")


def open_checked(path: Path) -> dict:
    """The meta of a complete cache whose file sizes are right; its checksums too on the first open since
    the machine started (after a crash, writes that were not yet on disk would show)."""
    meta = _read_meta(path)
    check_files(path, meta)
    stamp, boot = path / "verified", _boot_id()
    try:
        fresh = stamp.read_text() == boot
    except OSError:
        fresh = False
    if not fresh and meta.get("files"):
        log.info("cache %s: checking its checksums (first use since the machine started)", path.name)
        check_files(path, meta, checksums=True)
        with contextlib.suppress(OSError):  # a read-only cache is checked again next time
            atomic_write(stamp, boot)
    return meta


def verify_cache(path: Path) -> str:
    """``ok`` for a complete cache whose sizes and checksums hold, ``incomplete (...)`` for a build in progress
    or killed, or the problem; damaged chunk files of an incomplete build are listed (a rebuild redoes them)."""
    path = Path(path)
    if not (path / "index.npz").is_file():
        chunks = sorted((path / "chunks").glob("*.npz")) if (path / "chunks").is_dir() else []
        bad = [c.name for c in chunks if not _chunk_ok(c)]
        return f"incomplete ({len(chunks)} chunks done" + (f", damaged: {', '.join(bad)})" if bad else ")")
    try:
        meta = _read_meta(path)
        if not meta.get("files"):
            return "ok (written before checksums were kept: sizes and checksums not checked)"
        check_files(path, meta, checksums=True)
        atomic_write(path / "verified", _boot_id()) if os.access(path, os.W_OK) else None
    except CacheError as e:
        return str(e).split(" is damaged: ", 1)[-1].split(". Delete", 1)[0]
    return "ok"


def cached_features(recipe: Recipe, dataset: Dataset, extractor: PatchExtractor, views: int = 0,
                    codec: FeatureCodec | None = None) -> FeatureStore | None:
    """The complete cache of a split if one exists (a warm cache), without extracting it.

    ``codec``: how the rows are stored; default the recipe's (:func:`feature_codec`).
    """
    codec = codec or feature_codec(recipe, extractor)
    path = Path(recipe.runtime.cache_dir) / _digest(cache_fields(recipe, dataset, extractor, views, codec))
    return FeatureStore(path) if _complete(path) else None


def _complete(path: Path) -> bool:
    return (path / "index.npz").is_file()  # written last: its presence marks the cache complete


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def building(path: Path, what: str):
    """Build the cache folder ``path`` under its key's lock: a second process (or job) waits for the first
    and then finds the cache complete. Under ``torchrun`` rank 0 holds the lock for its job; the other
    ranks wait for it at a barrier. A folder that cannot be written is one clear error."""
    rank, _ = _rank_world()
    try:
        with file_lock(path.parent / ".locks" / f"{path.name}.lock", what) if rank == 0 else contextlib.nullcontext():
            _barrier()
            yield
            _barrier()
    except OSError as e:  # images fail as DatasetError: an OSError here is the cache folder's
        raise CacheError(f"cannot write {what} under {path.parent}: {e.strerror or e}. Set runtime.cache_dir to a "
                         "writable folder with free space (e.g. --set runtime.cache_dir=/tmp/patchnet-cache)") from None


def build_features(recipe: Recipe, dataset: Dataset, extractor: PatchExtractor, views: int = 0,
                   progress: bool = True, codec: FeatureCodec | None = None) -> FeatureStore:
    """Open the cached features of a split, computing what is missing first.

    Items are every image (view 0) and, with ``views`` > 0, that many augmented views of each.
    ``codec``: how the rows are stored; default the recipe's (:func:`feature_codec`). A compressed
    cache is encoded from the split's fp16 cache when that exists, without running the trunk.
    Under ``torchrun`` the ranks share the chunks and rank 0 joins them.
    """
    codec = codec or feature_codec(recipe, extractor, progress)
    fields = cache_fields(recipe, dataset, extractor, views, codec)
    key = _digest(fields)
    path = Path(recipe.runtime.cache_dir) / key
    if _complete(path):
        return FeatureStore(path)
    with building(path, f"feature cache {key}"):
        if not _complete(path):  # another process may have built it while this one waited
            _build_features(recipe, dataset, extractor, views, progress, codec, fields, path)
    return FeatureStore(path)


def _build_features(recipe, dataset, extractor, views, progress, codec, fields, path: Path) -> None:
    rank, world = _rank_world()
    items = [(r, v) for r in range(len(dataset.records)) for v in range(views + 1)]
    chunk = max(1, recipe.cache.chunk)
    meta = {"fields": fields, "feature_dim": codec.dim(extractor.feature_dim), "compress": codec.compress,
            "items": len(items), "chunk": chunk}
    layout = codec.layout(extractor.feature_dim)
    source = cached_features(recipe, dataset, extractor, views, FeatureCodec()) if codec.compress != "none" else None
    if source is not None:
        if rank == 0:
            log.info("feature cache %s: encoding the fp16 cache %s as %s", path.name, source.path.name, codec.compress)
            _transcode(source, codec, path, meta)
        _barrier()
        return
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    todo = _start_chunks(path, meta, len(chunks), rank, world)
    if rank == 0:
        _save_projection(path, codec)
    if todo:
        _compute_chunks(dataset, extractor, codec, chunks, todo, path, recipe, progress and rank == 0)
    _barrier()
    if rank == 0:
        _join_chunks(path, len(chunks), layout)


def _start_chunks(path: Path, meta: dict, num_chunks: int, rank: int, world: int) -> list[int]:
    """Prepare ``path`` for a chunked build (meta.json first) and return this rank's chunks still to compute.

    A chunk left by a killed build counts as done only when it reads back whole (every array, zip
    CRCs included, with one entry per item); a damaged one is deleted and computed again.
    """
    (path / "chunks").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write(path / "meta.json", json.dumps(meta, indent=1))
    mine = [c for c in range(num_chunks) if c % world == rank]
    todo = []
    for c in mine:
        target = _chunk_path(path, c)
        if target.is_file() and not _chunk_ok(target, len(range(c * meta["chunk"], min((c + 1) * meta["chunk"],
                                                                                          meta["items"])))):
            log.warning("cache %s: chunk %s is damaged; computing it again", path.name, target.name)
            target.unlink()
        if not target.is_file():
            todo.append(c)
    if len(todo) < len(mine):
        log.info("cache %s: resuming, %d of %d chunks already done", path.name, len(mine) - len(todo), len(mine))
    return todo


def _chunk_ok(target: Path, items: int | None = None) -> bool:
    """Whether a chunk file reads back whole: every array (the zip CRCs are checked on read) and, when
    ``items`` is given, one entry per item."""
    try:
        with np.load(target) as z:
            arrays = {name: z[name] for name in z.files}
        return "counts" in arrays and (items is None or len(arrays["counts"]) == items)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return False


def feature_codec(recipe: Recipe, extractor: PatchExtractor, progress: bool = True) -> FeatureCodec:
    """The recipe's ``cache.compress``, with its projection when it has one.

    A projection is fitted once on ``cache.pca_images`` images of the training split (drawn with a
    fixed seed; all their patches) and kept in ``<cache_dir>/projections/``, keyed by the training
    split's features and the PCA settings, so that every split and every run of them shares it.
    """
    c = recipe.cache
    if not c.compress.startswith("pca"):
        return FeatureCodec(c.compress)
    if c.pca_dim > extractor.feature_dim:
        raise CodecError(f"cache.pca_dim={c.pca_dim} exceeds the {extractor.feature_dim}-d features of "
                         f"{recipe.backbone.name}; choose at most {extractor.feature_dim}")
    dataset = open_split(recipe.data, recipe.data.train_split)
    fields = {"features": cache_fields(recipe, dataset, extractor), "pca_dim": c.pca_dim,
              "pca_images": c.pca_images, "seed": PCA_SEED}
    key = _digest(fields)
    path = Path(recipe.runtime.cache_dir) / "projections" / f"{key}.npz"
    if not path.is_file():
        with building(Path(recipe.runtime.cache_dir) / f"projection-{key}", f"PCA projection {key}"):
            if _rank_world()[0] == 0 and not path.is_file():
                _fit_projection(recipe, dataset, extractor, progress, fields, path)
    with _damaged_if_unreadable(path.parent, path.name), np.load(path) as z:
        return FeatureCodec(c.compress, z["mean"], z["components"])


def _fit_projection(recipe: Recipe, dataset: Dataset, extractor: PatchExtractor, progress: bool, fields: dict,
                    path: Path) -> None:
    c = recipe.cache
    moments = Moments(extractor.feature_dim)
    for rows in _projection_sample(recipe, dataset, extractor, progress):
        moments.add(rows)
    mean, components, kept = moments.pca(c.pca_dim)
    log.info("PCA projection on %d patches of %s: %d components keep %.1f%% of the variance", moments.n,
             dataset.name, c.pca_dim, 100 * kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mean=mean.astype(np.float32), components=components.astype(np.float32),
                                          kept=kept, patches=moments.n, fields=json.dumps(fields)))


def _projection_sample(recipe: Recipe, dataset: Dataset, extractor: PatchExtractor, progress: bool):
    """fp16 features of all patches of ``cache.pca_images`` training images (a fixed draw), image by image.

    Read from the split's fp16 cache when it exists, else extracted (the same rows either way).
    """
    chosen = np.sort(np.random.default_rng(PCA_SEED).permutation(len(dataset.records))[:recipe.cache.pca_images])
    warm = cached_features(recipe, dataset, extractor, codec=FeatureCodec())
    if warm is not None:
        for i in np.flatnonzero(np.isin(warm.record, chosen) & (warm.view == 0)):
            yield warm.rows[warm.item_slice(i)]
        return
    workers = recipe.runtime.workers
    loader = DataLoader(ItemImages(dataset.records, [(int(r), 0) for r in chosen]), batch_size=None, shuffle=False,
                        num_workers=workers, prefetch_factor=4 if workers else None)
    for _, image, info in tqdm(loader, total=len(chosen), desc="PCA sample", unit="img", disable=not progress,
                               dynamic_ncols=True):
        if image is None:
            log.warning("PCA sample: skipped unreadable image: %s", info)
            continue
        yield extractor(image).numpy().astype(np.float16).astype(np.float32)


def _chunk_path(path: Path, c: int) -> Path:
    return path / "chunks" / f"{c:06d}.npz"


def _chunk_loader(dataset, extractor, chunks, todo, recipe) -> tuple[list, DataLoader]:
    """The (chunk, item) pairs to compute, and a loader that decodes their images in worker processes."""
    flat = [(c, item) for c in todo for item in chunks[c]]
    source = ItemImages(dataset.records, [item for _, item in flat], recipe.aug, recipe.train.seed)
    workers = recipe.runtime.workers
    if extractor.device.type == "cpu":  # decoding processes must not take the trunk's cores (OpenMP stalls)
        workers = min(workers, max(0, (os.cpu_count() or 1) - torch.get_num_threads()))
    return flat, DataLoader(source, batch_size=None, shuffle=False, num_workers=workers,
                            prefetch_factor=4 if workers else None, pin_memory=extractor.device.type == "cuda")


def _compute_chunks(dataset, extractor, codec, chunks, todo, path, recipe, progress):
    flat, loader = _chunk_loader(dataset, extractor, chunks, todo, recipe)
    pending: dict[int, list] = {c: [] for c in todo}
    bar = tqdm(total=len(flat), desc=f"features {dataset.name.rsplit(':', 1)[-1]}", unit="img", disable=not progress,
               dynamic_ncols=True)
    start, patches = time.perf_counter(), 0
    for i, image, info in loader:
        c = flat[i][0]
        if image is None:
            log.warning("skipped unreadable image: %s", info)
            pending[c].append((None, None, info))
        else:
            h, w = image.shape[-2:]
            boxes = extractor.boxes(w, h)
            pending[c].append((codec.encode(extractor(image)), boxes, info))
            patches += len(boxes)
        bar.update(1)
        bar.set_postfix(patches_s=f"{patches / (time.perf_counter() - start):.0f}", refresh=False)
        if len(pending[c]) == len(chunks[c]):
            _write_chunk(_chunk_path(path, c), pending.pop(c), codec.layout(extractor.feature_dim))
    bar.close()


def _write_chunk(target: Path, results: list, layout: dict) -> None:
    feats, patch_boxes, counts, ok, objects, failures = [], [], [], [], [], []
    for f, boxes, info in results:
        if f is None:
            counts.append(0), ok.append(False), failures.append(info)
            objects.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)))
        else:
            feats.append(f), patch_boxes.append(boxes), counts.append(len(boxes)), ok.append(True)
            objects.append(info)
    _save_chunk(target, patch_boxes, counts, ok, objects, failures,
                **{name: np.concatenate([f[name] for f in feats]) if feats else np.zeros((0, width), dtype)
                   for name, (dtype, width) in layout.items()})


def _save_chunk(target: Path, patch_boxes: list, counts: list, ok: list, objects: list, failures: list,
                **arrays: np.ndarray) -> None:
    """Write a chunk atomically: ``arrays`` of its kind plus the per-item indexes every chunk has."""
    atomic_write(target, lambda f: np.savez(
        f, **arrays,
        patch_boxes=np.concatenate(patch_boxes) if patch_boxes else np.zeros((0, 4), np.float32),
        counts=np.array(counts, np.int64), ok=np.array(ok),
        box_counts=np.array([len(o[0]) for o in objects], np.int64),
        boxes=np.concatenate([o[0] for o in objects]).astype(np.float32),
        box_classes=np.concatenate([o[1] for o in objects]).astype(np.int64),
        box_difficult=np.concatenate([o[2] for o in objects]).astype(bool),
        failures=np.array(failures, dtype=str)))


def _write_rows(path: Path, layout: dict, total: int, blocks) -> dict[str, dict]:
    """Write ``total`` rows of each stored array from ``blocks`` (dicts of consecutive rows); returns each
    file's size and CRC-32, computed as it is written.

    Plain appends, not a writable memory map: the dirty pages of a map count as the process's resident
    memory until they are written back, which made the peak memory of a build grow with the dataset.
    """
    files = {name: path / _file(name, dtype) for name, (dtype, _) in layout.items()}
    tmps = {name: temporary_name(f) for name, f in files.items()}
    outs = {name: open(tmps[name], "wb") for name in files}
    crcs = dict.fromkeys(files, 0)
    pos = 0
    try:
        for block in blocks:
            for name, out in outs.items():
                dtype, width = layout[name]
                data = np.ascontiguousarray(block[name], dtype=dtype).reshape(-1, width).data
                out.write(data)
                crcs[name] = zlib.crc32(data, crcs[name])
            pos += len(next(iter(block.values())))
        for out in outs.values():
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        for name, out in outs.items():
            out.close()
            tmps[name].unlink(missing_ok=True)
        raise
    for out in outs.values():
        out.close()
    if pos != total:
        raise RuntimeError(f"{path}: wrote {pos} rows, expected {total}")
    for name, f in files.items():
        os.replace(tmps[name], f)
    return {f.name: {"size": f.stat().st_size, "crc32": crcs[name]} for name, f in files.items()}


def _transcode(source: FeatureStore, codec: FeatureCodec, path: Path, meta: dict, block: int = 65536) -> None:
    """Encode a complete fp16 cache into ``path`` with ``codec``: the same items and index, no trunk."""
    path.mkdir(parents=True, exist_ok=True)
    _save_projection(path, codec)
    total = source.num_patches
    files = _write_rows(path, codec.layout(source.feature_dim), total,
                        (codec.encode(source.rows[s:s + block]) for s in range(0, total, block)))
    _complete_cache(path, {**meta, "failures": source.failures}, files, (source.path / "index.npz").read_bytes())


def _save_projection(path: Path, codec: FeatureCodec) -> None:
    """The projection beside the rows, so that a store maps them back on its own (``trunk_rows``)."""
    if codec.components is not None:
        atomic_write(path / "projection.npz", lambda f: np.savez(f, mean=codec.mean, components=codec.components))


def _complete_cache(path: Path, meta: dict, files: dict[str, dict], index: bytes) -> None:
    """Record every file's size and checksum in meta.json, then write index.npz, whose presence marks the
    cache complete; both fsynced."""
    files = {**files, "index.npz": {"size": len(index), "crc32": zlib.crc32(index)}}
    atomic_write(path / "meta.json", json.dumps({**meta, "files": files}, indent=1))
    atomic_write(path / "index.npz", index)
    atomic_write(path / "verified", _boot_id())


def _join_chunks(path: Path, num_chunks: int, layout: dict) -> None:
    parts = [np.load(_chunk_path(path, c)) for c in range(num_chunks)]
    total = int(sum(p["counts"].sum() for p in parts))
    files = _write_rows(path, layout, total, ({name: p[name] for name in layout} for p in parts))
    _finish_join(path, parts, "feature cache", files)


def _finish_join(path: Path, parts: list, what: str, files: dict[str, dict], **index: np.ndarray) -> None:
    """Write the item and box indexes every chunk has (plus ``index``), then mark the cache complete."""
    meta = _read_meta(path)
    cat = lambda name: np.concatenate([p[name] for p in parts])  # noqa: E731
    counts = cat("counts")
    views = meta["fields"]["views"] + 1
    images = len(counts) // views
    buf = io.BytesIO()
    np.savez(buf, **index,
             offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
             record=np.repeat(np.arange(images), views), view=np.tile(np.arange(views), images),
             ok=cat("ok"), patch_boxes=cat("patch_boxes"),
             box_offsets=np.concatenate([[0], np.cumsum(cat("box_counts"))]).astype(np.int64),
             boxes=cat("boxes").reshape(-1, 4), box_classes=cat("box_classes"), box_difficult=cat("box_difficult"))
    failures = [str(s) for p in parts for s in p["failures"]]
    for p in parts:
        p.close()
    meta["failures"] = failures
    _complete_cache(path, meta, files, buf.getvalue())
    shutil.rmtree(path / "chunks", ignore_errors=True)
    if failures:
        log.warning("%s: %d unreadable images skipped (first: %s)", what, len(failures), failures[0])


# --------------------------------------------------------------------------- boundary maps (train.unlock)

MAP_VERSION = 1  # bump whenever what build_maps stores changes


class MapStore(FeatureStore):
    """A complete cache of boundary maps (``train.unlock``), opened read-only.

    Per item and level, the (h, w, C) map at the boundary below the unlocked stages, fp16 and
    memory-mapped as rows of cells (``maps``); per patch, the level it is pooled from
    (``patch_level``); the item indexes of ``FeatureStore``. Its ``rows`` (and ``trunk_rows``, the
    same: nothing is projected) are computed on read by the unlocked stages once ``attach`` has
    given them.
    """

    def __init__(self, path: Path):  # FeatureStore's indexes, and maps in place of features
        self.path = path
        meta = open_checked(path)
        self.fields, self.feature_dim, self.map_dim = meta["fields"], meta["feature_dim"], meta["map_dim"]
        _load_index(self, path)
        self.maps = _memmap(path, "maps.f16", np.float16, (int(self.cell_offsets[-1]), self.map_dim))
        self.rows = self.trunk_rows = None
        self.failures: list[str] = meta.get("failures", [])

    def item_maps(self, i: int) -> ImageMaps:
        """The boundary maps of item ``i`` and its patches."""
        a, b = int(self.level_offsets[i]), int(self.level_offsets[i + 1])
        maps = [self.maps[self.cell_offsets[lv]:self.cell_offsets[lv + 1]].reshape(*self.level_shape[lv], self.map_dim)
                for lv in range(a, b)]
        s = self.item_slice(i)
        return ImageMaps(maps, self.level_factor[a:b], self.patch_boxes[s], self.patch_level[s])

    def attach(self, stages: UnlockedStages, dtype: torch.dtype | None) -> "MapStore":
        """From now on, read ``rows`` through ``stages`` as they are at the time of reading."""
        self.rows = self.trunk_rows = MapFeatures(self, stages, dtype)
        return self


class MapFeatures:
    """The (P, d) float32 patch features of a ``MapStore``, computed on read by the unlocked stages.

    Read by slices (``rows[a:b]``), as ``patchnet.pooling``, ``AdaptationHead.logits`` and the
    heatmaps read ``FeatureStore.rows``; the items a slice touches run whole, under autocast to
    ``dtype`` (None: fp32).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, store: MapStore, stages: UnlockedStages, dtype: torch.dtype | None):
        self.store, self.stages, self.autocast = store, stages, dtype
        self.shape = (store.num_patches, store.feature_dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        start, stop, step = index.indices(len(self)) if isinstance(index, slice) else (0, 0, 0)
        if step != 1:
            raise TypeError(f"the rows of a map store are read by slices of consecutive rows, not {index!r}")
        if stop <= start:
            return np.zeros((0, self.shape[1]), np.float32)
        offsets = self.store.offsets
        first, last = int(np.searchsorted(offsets, start, "right")) - 1, int(np.searchsorted(offsets, stop, "left"))
        device = self.stages.backbone.mean.device
        with torch.inference_mode(), torch.autocast(device.type, dtype=self.autocast or torch.float32,
                                                    enabled=self.autocast is not None):
            feats = self.stages([self.store.item_maps(i) for i in range(first, last)])
        base = int(offsets[first])
        return feats.float().cpu().numpy()[start - base:stop - base]


def build_maps(recipe: Recipe, dataset: Dataset, extractor: PatchExtractor, views: int = 0,
               progress: bool = True) -> MapStore:
    """Open the cached boundary maps of a split for ``train.unlock``, computing what is missing first.

    Items, chunks and resumption as in ``build_features``; the key adds the unlocked stages.
    """
    p = recipe.patches
    if p.mode != "shared" or p.exact_up_to:
        raise PatchnetError(f"train.unlock trains on the cached maps of shared mode's trunk passes, which "
                            f"patches.mode={p.mode} with patches.exact_up_to={p.exact_up_to} does not make; set "
                            "patches.mode: shared and patches.exact_up_to: 0, or train.unlock: 0")
    unlock = unlock_split(backbone_spec(recipe.backbone.name), recipe.train.unlock)
    fields = {**cache_fields(recipe, dataset, extractor, views), "maps": MAP_VERSION, "unlock": unlock.n,
              "boundary": unlock.boundary.name}
    key = _digest(fields)
    path = Path(recipe.runtime.cache_dir) / key
    if _complete(path):
        return MapStore(path)
    with building(path, f"map cache {key}"):
        if not _complete(path):
            rank, world = _rank_world()
            items = [(r, v) for r in range(len(dataset.records)) for v in range(views + 1)]
            chunk = max(1, recipe.cache.chunk)
            chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
            meta = {"fields": fields, "feature_dim": extractor.feature_dim, "map_dim": unlock.boundary.dim,
                    "items": len(items), "chunk": chunk}
            todo = _start_chunks(path, meta, len(chunks), rank, world)
            if todo:
                _compute_map_chunks(dataset, extractor, unlock, chunks, todo, path, recipe, progress and rank == 0)
            _barrier()
            if rank == 0:
                _join_map_chunks(path, len(chunks), unlock.boundary.dim)
    return MapStore(path)


def _compute_map_chunks(dataset, extractor, unlock, chunks, todo, path, recipe, progress):
    flat, loader = _chunk_loader(dataset, extractor, chunks, todo, recipe)
    pending: dict[int, list] = {c: [] for c in todo}
    for i, image, info in tqdm(loader, total=len(flat), desc=f"maps {dataset.name.rsplit(':', 1)[-1]}", unit="img",
                               disable=not progress, dynamic_ncols=True):
        c = flat[i][0]
        if image is None:
            log.warning("skipped unreadable image: %s", info)
        pending[c].append((None if image is None else extractor.maps(image, unlock.part), info))
        if len(pending[c]) == len(chunks[c]):
            _write_map_chunk(_chunk_path(path, c), pending.pop(c), unlock.boundary.dim)


def _write_map_chunk(target: Path, results: list, dim: int) -> None:
    maps, shapes, factors, levels, level_counts, patch_boxes, counts, ok, objects, failures = ([] for _ in range(10))
    for m, info in results:
        if m is None:
            level_counts.append(0), counts.append(0), ok.append(False), failures.append(info)
            objects.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)))
        else:
            maps += [x.reshape(-1, x.shape[-1]) for x in m.maps]
            shapes += [x.shape[:2] for x in m.maps]
            factors.append(m.factors), levels.append(m.level), level_counts.append(len(m.maps))
            patch_boxes.append(m.boxes), counts.append(len(m.boxes)), ok.append(True), objects.append(info)
    _save_chunk(target, patch_boxes, counts, ok, objects, failures,
                maps=np.concatenate(maps) if maps else np.zeros((0, dim), np.float16),
                level_shape=np.array(shapes, np.int64).reshape(-1, 2),
                level_factor=np.concatenate(factors) if factors else np.zeros((0, 2)),
                level_counts=np.array(level_counts, np.int64),
                patch_level=np.concatenate(levels) if levels else np.zeros(0, np.int64))


def _join_map_chunks(path: Path, num_chunks: int, dim: int) -> None:
    parts = [np.load(_chunk_path(path, c)) for c in range(num_chunks)]
    cat = lambda name: np.concatenate([p[name] for p in parts])  # noqa: E731
    shapes = cat("level_shape").reshape(-1, 2)
    cells = np.concatenate([[0], np.cumsum(shapes.prod(1))]).astype(np.int64)
    files = _write_rows(path, {"maps": (np.dtype(np.float16), dim)}, int(cells[-1]),
                        ({"maps": p["maps"]} for p in parts))
    _finish_join(path, parts, "map cache", files, patch_level=cat("patch_level"),
                 level_offsets=np.concatenate([[0], np.cumsum(cat("level_counts"))]).astype(np.int64),
                 level_shape=shapes, level_factor=cat("level_factor").reshape(-1, 2), cell_offsets=cells)
