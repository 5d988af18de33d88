"""The chunk files of a build in progress: ``chunks/NNNNNN.npz``, one per run of consecutive items, each
written atomically as soon as its items are done, so that a killed build resumes at the first missing chunk.

A chunk records its first item and holds one entry per item, so a chunk left by a build with another
chunk size (``cache.chunk``), or damaged, is never taken for this build's: it is computed again.
``finish_join`` writes the item index of the joined chunks and marks the cache complete.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..dist import rank_world
from ..files import atomic_write
from .integrity import UNREADABLE, Files, Meta, complete_cache, read_meta

log = logging.getLogger("patchnet")

INDEX_ARRAYS = ("counts", "ok", "patch_boxes", "box_counts", "boxes", "box_classes", "box_difficult", "failures")


def chunk_path(path: Path, c: int) -> Path:
    return path / "chunks" / f"{c:06d}.npz"


def chunk_problem(target: Path, first: int | None = None, items: int | None = None) -> str | None:
    """None when a chunk file reads back whole (every array; the zip CRCs are checked on read) and, when
    ``first`` and ``items`` are given, holds exactly the items ``first`` to ``first + items``; else what is wrong."""
    try:
        with np.load(target) as z:
            arrays = {name: z[name] for name in z.files}
    except UNREADABLE:
        return "is damaged"
    if "counts" not in arrays:
        return "is damaged"
    if first is not None and ("first" not in arrays or int(arrays["first"]) != first or len(arrays["counts"]) != items):
        return "holds other items (written with another cache.chunk, or by an earlier version)"
    return None


def start_chunks(path: Path, meta: Meta, num_chunks: int) -> list[int]:
    """Prepare ``path`` for a chunked build (meta.json first) and return this rank's chunks still to compute.

    ``meta`` holds ``items`` and ``chunk`` (items per chunk). A chunk left by a killed build counts as
    done only when it reads back whole and holds this chunk's items; any other is deleted and computed again.
    """
    rank, world = rank_world()
    (path / "chunks").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write(path / "meta.json", json.dumps(meta, indent=1))
    mine = [c for c in range(num_chunks) if c % world == rank]
    todo = []
    for c in mine:
        target = chunk_path(path, c)
        first = c * meta["chunk"]
        problem = chunk_problem(target, first, min(first + meta["chunk"], meta["items"]) - first)
        if target.is_file() and problem:
            log.warning("cache %s: chunk %s %s; computing it again", path.name, target.name, problem)
            target.unlink()
        if not target.is_file():
            todo.append(c)
    if len(todo) < len(mine):
        log.info("cache %s: resuming, %d of %d chunks already done", path.name, len(mine) - len(todo), len(mine))
    return todo


def save_chunk(target: Path, first: int, results: list[tuple[Any, Any]], **arrays: np.ndarray) -> None:
    """Write a chunk atomically: ``arrays`` of its kind plus its first item and the per-item indexes every
    chunk has.

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
            first=np.int64(first),
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


def chunk_arrays(path: Path, num_chunks: int, names: Iterable[str]) -> dict[str, list[np.ndarray]]:
    """The arrays ``names`` of every chunk, each file opened and closed in turn (thousands of chunks stay
    within the limit of open files)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for c in range(num_chunks):
        with np.load(chunk_path(path, c)) as z:
            for name in names:
                out[name].append(z[name])
    return out


def chunk_rows(path: Path, num_chunks: int, names: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
    """The row arrays ``names`` of one chunk after another, without holding more than one chunk."""
    for c in range(num_chunks):
        with np.load(chunk_path(path, c)) as z:
            yield {name: z[name] for name in names}


def finish_join(path: Path, parts: dict[str, list[np.ndarray]], what: str, files: Files, **index: np.ndarray) -> None:
    """Write the item and box indexes every chunk has (``parts``, from ``chunk_arrays``; plus ``index``), then
    mark the cache complete and remove the chunks."""
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
