"""The on-disk feature store: rows memory-mapped, written in chunks, guarded by a lock and checksums.

A cache folder holds one split's patch features (or, for ``train.unlock``, its boundary maps):
``meta.json`` (what it was built from, and each file's size and CRC-32), the rows
(``features.f16``; or ``features.u8`` and ``scales.f32``, see ``patchnet.codec``) and ``index.npz``
(per item: its patch offsets and boxes, its objects), written last: its presence marks the cache
complete. A build writes chunks of items atomically first, so a killed build resumes at the first
missing chunk; one process builds a key at a time (``building``). This module stores and reads; what
goes in is computed by ``patchnet.features`` (and ``patchnet.unlock``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import cast

import numpy as np

from .codec import FeatureCodec, decode_rows, stored_layout
from .dist import barrier, rank_world
from .errors import PatchnetError
from .files import atomic_write, file_crc, file_lock, temporary_name

log = logging.getLogger("patchnet")

CACHE_VERSION = 2  # bump whenever the patch grid or feature code changes what is stored


class Rows:
    """The (P, d) float32 feature rows of a store, decoded on read: ``rows[a:b]``, ``rows[index_array]``, ``rows[i]``.

    With a ``codec``, rows are mapped back through its projection (``FeatureCodec.unproject``).
    Functions that take a feature array (``patchnet.pooling``, ``AdaptationHead.logits``) take this too.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, features: np.ndarray, scales: np.ndarray | None = None, codec: FeatureCodec | None = None):
        self.stored, self.scales, self.codec = features, scales, codec
        # a codec is given only with a projection to map the rows back through
        self.shape = (
            len(features),
            features.shape[1] if codec is None else cast(np.ndarray, codec.components).shape[1],
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = decode_rows(self.stored[index], None if self.scales is None else self.scales[index])
        return rows if self.codec is None else self.codec.unproject(rows)


def _file(name: str, dtype: np.dtype) -> str:
    return f"{name}.{ {'float16': 'f16', 'uint8': 'u8', 'float32': 'f32'}[dtype.name] }"


class ItemIndex:
    """A complete cache opened read-only: its meta, and per item (an image or an augmented view) its record,
    view, whether it was readable, its patches (offsets into the rows, boxes) and its objects."""

    offsets: np.ndarray  # (items + 1,) first row of each item's patches
    record: np.ndarray  # (items,) the record of each item
    view: np.ndarray  # (items,) 0: the image; v > 0: augmented view v
    ok: np.ndarray  # (items,) False for an unreadable image (no patches)
    patch_boxes: np.ndarray  # (P, 4) every patch, in pixels of its image (or view)
    box_offsets: np.ndarray  # (items + 1,) first object of each item
    boxes: np.ndarray  # (K, 4) objects (transformed for augmented views)
    box_classes: np.ndarray
    box_difficult: np.ndarray

    def __init__(self, path: Path):
        self.path = path
        self.meta = open_checked(path)
        self.fields, self.feature_dim = self.meta["fields"], self.meta["feature_dim"]
        self.failures: list[str] = self.meta.get("failures", [])
        with _damaged_if_unreadable(path, "index.npz"), np.load(path / "index.npz") as idx:
            for name in idx.files:
                setattr(self, name, idx[name])

    def __len__(self) -> int:
        return len(self.record)

    @property
    def num_patches(self) -> int:
        return int(self.offsets[-1])

    def item_slice(self, i: int | np.integer) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def item_objects(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        return self.boxes[s], self.box_classes[s], self.box_difficult[s]


class FeatureStore(ItemIndex):
    """A complete feature cache, opened read-only: feature rows (P, d) memory-mapped, and the item indexes.

    ``rows`` decodes the rows the head reads; ``feature_dim`` is their dimension (``cache.pca_dim``
    after a projection). ``trunk_rows`` maps them back to the trunk's space for features pooled by
    their maximum (the same view as ``rows`` without a projection).
    """

    def __init__(self, path: Path):
        super().__init__(path)
        self.compress: str = self.meta.get("compress", "none")
        arrays = {
            name: memmap(path, _file(name, dtype), dtype, (self.num_patches, width))
            for name, (dtype, width) in stored_layout(self.compress, self.feature_dim).items()
        }
        self.rows = Rows(**arrays, codec=None)
        projection = {}
        if (path / "projection.npz").is_file():
            with _damaged_if_unreadable(path, "projection.npz"), np.load(path / "projection.npz") as z:
                projection = {"mean": z["mean"], "components": z["components"]}
        self.codec = FeatureCodec(self.compress, **projection)
        self.trunk_rows = self.rows if self.codec.components is None else Rows(**arrays, codec=self.codec)
        self._stored = arrays

    def stored_item(self, i: int) -> tuple[dict[str, np.ndarray], np.ndarray] | str:
        """Item ``i`` as stored: its row arrays and patch boxes, or the failure message of an unreadable image."""
        if not self.ok[i]:
            return self.failures[int(np.count_nonzero(~self.ok[:i]))]
        s = self.item_slice(i)
        return {name: np.asarray(a[s]) for name, a in self._stored.items()}, self.patch_boxes[s]


# --------------------------------------------------------------------------- integrity


class CacheError(PatchnetError, RuntimeError):
    """A cache folder that is damaged or cannot be written; the message names it and how to rebuild it."""


def damaged(path: Path, problem: str) -> CacheError:
    return CacheError(
        f"cache {path} is damaged: {problem}. Delete the folder to rebuild it (rm -r {path}); the "
        "next run recomputes it. `patchnet cache verify` checks every cache of a folder"
    )


@contextlib.contextmanager
def _damaged_if_unreadable(path: Path, name: str):
    try:
        yield
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise damaged(path, f"{name} cannot be read ({type(e).__name__}: {e})") from None


def read_meta(path: Path) -> dict:
    with _damaged_if_unreadable(path, "meta.json"):
        meta = json.loads((path / "meta.json").read_text())
    if not isinstance(meta, dict) or "fields" not in meta:
        raise damaged(path, "meta.json holds no cache description")
    return meta


def memmap(path: Path, name: str, dtype, shape: tuple[int, int]) -> np.ndarray:
    if not shape[0]:
        return np.zeros(shape, dtype)
    with _damaged_if_unreadable(path, name):
        return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)


def boot_id() -> str:
    """An id of this boot of the machine (Linux), so that a cache is re-verified once after a crash."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def check_files(path: Path, meta: dict, checksums: bool = False) -> None:
    """Raise ``CacheError`` unless every file ``meta`` records has its size (and, with ``checksums``, its CRC-32)."""
    for name, info in meta.get("files", {}).items():
        f = path / name
        with _damaged_if_unreadable(path, name):
            if not f.is_file():
                raise damaged(path, f"{name} is missing")
            size = f.stat().st_size
            if size != info["size"]:
                raise damaged(path, f"{name} is {size} bytes, {info['size']} were written (truncated or replaced)")
            if checksums and file_crc(f) != info["crc32"]:
                raise damaged(path, f"{name} does not match its checksum (its bytes changed after it was written)")


def _stamp(path: Path) -> Path:
    """The mark that this machine, in this boot, has checked the cache's checksums (one per machine: a cache on
    shared storage is checked once by each)."""
    return path / f"verified-{boot_id()}"


def open_checked(path: Path) -> dict:
    """The meta of a complete cache whose file sizes are right; its checksums too on the first open since
    the machine started (after a crash, writes that were not yet on disk would show), by rank 0."""
    meta = read_meta(path)
    check_files(path, meta)
    if meta.get("files") and rank_world()[0] == 0 and not _stamp(path).is_file():
        log.info("cache %s: checking its checksums (first use since the machine started)", path.name)
        check_files(path, meta, checksums=True)
        with contextlib.suppress(OSError):  # a read-only cache is checked again next time
            atomic_write(_stamp(path), "")
    return meta


def verify_cache(path: Path) -> str:
    """``ok`` for a complete cache whose sizes and checksums hold, ``incomplete (...)`` for a build in progress
    or killed, or the problem; damaged chunk files of an incomplete build are listed (a rebuild redoes them)."""
    path = Path(path)
    if not (path / "index.npz").is_file():
        chunks = sorted((path / "chunks").glob("*.npz")) if (path / "chunks").is_dir() else []
        bad = [c.name for c in chunks if not chunk_ok(c)]
        return f"incomplete ({len(chunks)} chunks done" + (f", damaged: {', '.join(bad)})" if bad else ")")
    try:
        meta = read_meta(path)
        if not meta.get("files"):
            return "ok (written before checksums were kept: sizes and checksums not checked)"
        check_files(path, meta, checksums=True)
        with contextlib.suppress(OSError):
            atomic_write(_stamp(path), "")
    except CacheError as e:
        return str(e).split(" is damaged: ", 1)[-1].split(". Delete", 1)[0]
    return "ok"


# --------------------------------------------------------------------------- building


def complete(path: Path) -> bool:
    return (path / "index.npz").is_file()  # written last: its presence marks the cache complete


def ready(path: Path) -> bool:
    """Whether the cache can be opened without entering ``building``: complete, and not under ``torchrun``,
    whose ranks must all enter it to decide together."""
    return rank_world()[1] == 1 and complete(path)


@contextlib.contextmanager
def building(path: Path, what: str):
    """Build the cache folder ``path`` under its key's lock: a second process (or job) waits for the first
    and then finds the cache complete. Under ``torchrun`` rank 0 holds the lock for its job; the other
    ranks wait for it at a barrier. A folder that cannot be written is one clear error."""
    rank, _ = rank_world()
    try:
        with file_lock(path.parent / ".locks" / f"{path.name}.lock", what) if rank == 0 else contextlib.nullcontext():
            barrier()
            if rank == 0 and path.is_dir():
                _remove_stale(path)
            yield
            barrier()
    except OSError as e:
        if e.errno in _UNWRITABLE:
            raise CacheError(
                f"cannot write {what} under {path.parent}: {e.strerror}. Set runtime.cache_dir to a "
                "writable folder with free space (e.g. --set runtime.cache_dir=/tmp/patchnet-cache)"
            ) from None
        raise


_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def _remove_stale(path: Path) -> None:
    """Temporary files of a build that was killed (the lock is held: no other process writes here now)."""
    for tmp in [*path.glob(".*.tmp"), *path.glob("chunks/.*.tmp")]:
        tmp.unlink(missing_ok=True)


def chunk_path(path: Path, c: int) -> Path:
    return path / "chunks" / f"{c:06d}.npz"


def start_chunks(path: Path, meta: dict, num_chunks: int) -> list[int]:
    """Prepare ``path`` for a chunked build (meta.json first) and return this rank's chunks still to compute.

    ``meta`` holds ``items`` and ``chunk`` (items per chunk). A chunk left by a killed build counts as
    done only when it reads back whole (every array, zip CRCs included, one entry per item); a
    damaged one is deleted and computed again.
    """
    rank, world = rank_world()
    (path / "chunks").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write(path / "meta.json", json.dumps(meta, indent=1))
    mine = [c for c in range(num_chunks) if c % world == rank]
    todo = []
    for c in mine:
        target = chunk_path(path, c)
        items = min((c + 1) * meta["chunk"], meta["items"]) - c * meta["chunk"]
        if target.is_file() and not chunk_ok(target, items):
            log.warning("cache %s: chunk %s is damaged; computing it again", path.name, target.name)
            target.unlink()
        if not target.is_file():
            todo.append(c)
    if len(todo) < len(mine):
        log.info("cache %s: resuming, %d of %d chunks already done", path.name, len(mine) - len(todo), len(mine))
    return todo


def chunk_ok(target: Path, items: int | None = None) -> bool:
    """Whether a chunk file reads back whole: every array (the zip CRCs are checked on read) and, when
    ``items`` is given, one entry per item."""
    try:
        with np.load(target) as z:
            arrays = {name: z[name] for name in z.files}
        return "counts" in arrays and (items is None or len(arrays["counts"]) == items)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return False


def save_chunk(target: Path, results: list, **arrays: np.ndarray) -> None:
    """Write a chunk atomically: ``arrays`` of its kind plus the per-item indexes every chunk has.

    ``results``: per item ``(patch_boxes, objects)``, or ``(None, failure message)`` for an unreadable one.
    """
    done = [(b, o) for b, o in results if b is not None]
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
    objects = [o if b is not None else empty for b, o in results]
    atomic_write(
        target,
        lambda f: np.savez(
            f,
            **arrays,  # type: ignore[arg-type]  # numpy's stub: **arrays might bind allow_pickle
            patch_boxes=np.concatenate([b for b, _ in done]) if done else np.zeros((0, 4), np.float32),
            counts=np.array([0 if b is None else len(b) for b, _ in results], np.int64),
            ok=np.array([b is not None for b, _ in results]),
            box_counts=np.array([len(o[0]) for o in objects], np.int64),
            boxes=np.concatenate([o[0] for o in objects]).astype(np.float32),
            box_classes=np.concatenate([o[1] for o in objects]).astype(np.int64),
            box_difficult=np.concatenate([o[2] for o in objects]).astype(bool),
            failures=np.array([o for b, o in results if b is None], dtype=str),
        ),
    )


def save_feature_chunk(target: Path, results: list, layout: dict) -> None:
    """A chunk of feature rows: ``results`` per item ``(encoded arrays, patch boxes, objects)``, or ``(None,
    None, failure message)``."""
    done = [r for r in results if r[0] is not None]
    save_chunk(
        target,
        [(b, o) for _, b, o in results],
        **{
            name: np.concatenate([f[name] for f, _, _ in done]) if done else np.zeros((0, width), dtype)
            for name, (dtype, width) in layout.items()
        },
    )


def write_rows(path: Path, layout: dict, total: int, blocks) -> dict[str, dict]:
    """Write ``total`` rows of each stored array from ``blocks`` (dicts of consecutive rows); returns each
    file's size and CRC-32, computed as it is written.

    Plain appends, not a writable memory map: the dirty pages of a map count as the process's resident
    memory until they are written back, which made the peak memory of a build grow with the dataset.
    """
    files = {name: path / _file(name, dtype) for name, (dtype, _) in layout.items()}
    tmps = {name: temporary_name(f) for name, f in files.items()}
    crcs = dict.fromkeys(files, 0)
    pos = 0
    try:
        with contextlib.ExitStack() as stack:
            outs = {name: stack.enter_context(open(tmps[name], "wb")) for name in files}
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
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    if pos != total:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{path}: wrote {pos} rows, expected {total}")
    for name, f in files.items():
        os.replace(tmps[name], f)
    return {f.name: {"size": f.stat().st_size, "crc32": crcs[name]} for name, f in files.items()}


def transcode(source: FeatureStore, codec: FeatureCodec, path: Path, meta: dict, block: int = 65536) -> None:
    """Encode a complete fp16 cache into ``path`` with ``codec``: the same items and index, no trunk."""
    path.mkdir(parents=True, exist_ok=True)
    save_projection(path, codec)
    total = source.num_patches
    files = write_rows(
        path,
        codec.layout(source.feature_dim),
        total,
        (codec.encode(source.rows[s : s + block]) for s in range(0, total, block)),
    )
    complete_cache(path, {**meta, "failures": source.failures}, files, (source.path / "index.npz").read_bytes())


def save_projection(path: Path, codec: FeatureCodec) -> None:
    """The projection beside the rows, so that a store maps them back on its own (``trunk_rows``)."""
    if codec.components is not None:
        mean, components = cast(np.ndarray, codec.mean), codec.components  # the mean is set with the components
        atomic_write(path / "projection.npz", lambda f: np.savez(f, mean=mean, components=components))


def complete_cache(path: Path, meta: dict, files: dict[str, dict], index: bytes) -> None:
    """Record every file's size and checksum in meta.json, then write index.npz, whose presence marks the
    cache complete; both fsynced."""
    files = {**files, "index.npz": {"size": len(index), "crc32": zlib.crc32(index)}}
    atomic_write(path / "meta.json", json.dumps({**meta, "files": files}, indent=1))
    atomic_write(path / "index.npz", index)
    atomic_write(_stamp(path), "")


INDEX_ARRAYS = ("counts", "ok", "patch_boxes", "box_counts", "boxes", "box_classes", "box_difficult", "failures")


def chunk_arrays(path: Path, num_chunks: int, names) -> dict[str, list[np.ndarray]]:
    """The arrays ``names`` of every chunk, each file opened and closed in turn (thousands of chunks stay
    within the limit of open files)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for c in range(num_chunks):
        with np.load(chunk_path(path, c)) as z:
            for name in names:
                out[name].append(z[name])
    return out


def chunk_rows(path: Path, num_chunks: int, names):
    """The row arrays ``names`` of one chunk after another, without holding more than one chunk."""
    for c in range(num_chunks):
        with np.load(chunk_path(path, c)) as z:
            yield {name: z[name] for name in names}


def join_feature_chunks(path: Path, num_chunks: int, layout: dict) -> None:
    parts = chunk_arrays(path, num_chunks, INDEX_ARRAYS)
    total = int(sum(c.sum() for c in parts["counts"]))
    files = write_rows(path, layout, total, chunk_rows(path, num_chunks, layout))
    finish_join(path, parts, "feature cache", files)


def finish_join(
    path: Path, parts: dict[str, list[np.ndarray]], what: str, files: dict[str, dict], **index: np.ndarray
) -> None:
    """Write the item and box indexes every chunk has (``parts``, from ``chunk_arrays``; plus ``index``), then
    mark the cache complete."""
    meta = read_meta(path)

    def cat(name: str) -> np.ndarray:
        return np.concatenate(parts[name])

    counts = cat("counts")
    views = meta["fields"]["views"] + 1
    images = len(counts) // views
    buf = io.BytesIO()
    np.savez(
        buf,
        **index,  # type: ignore[arg-type]  # numpy's stub: **index might bind allow_pickle
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        record=np.repeat(np.arange(images), views),
        view=np.tile(np.arange(views), images),
        ok=cat("ok"),
        patch_boxes=cat("patch_boxes"),
        box_offsets=np.concatenate([[0], np.cumsum(cat("box_counts"))]).astype(np.int64),
        boxes=cat("boxes").reshape(-1, 4),
        box_classes=cat("box_classes"),
        box_difficult=cat("box_difficult"),
    )
    failures = [str(f) for part in parts["failures"] for f in part]
    meta["failures"] = failures
    complete_cache(path, meta, files, buf.getvalue())
    shutil.rmtree(path / "chunks", ignore_errors=True)
    if failures:
        log.warning("%s: %d unreadable images skipped (first: %s)", what, len(failures), failures[0])
