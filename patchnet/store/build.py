"""A chunked build of a cache folder: items (an image, or an augmented view of it) computed in order, a chunk of
them written as soon as its items are done; under ``torchrun`` the ranks compute disjoint chunks.

What an item holds is computed by the caller (``compute``: features, boundary maps, stage vectors) and
packed into a chunk's arrays by it (``pack``); the store decodes the images and owns the chunk files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Dataset, iter_images
from ..dist import barrier, rank_world
from ..recipe import AugConfig
from .chunks import chunk_path, save_chunk, start_chunks
from .codec import FeatureCodec
from .integrity import Meta


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


Computed = tuple[Any, np.ndarray]  # an item's payload and its (P, 4) patch boxes
Pack = Callable[[list[Any]], dict[str, np.ndarray]]  # the payloads of a chunk's items (None: unreadable) -> its arrays


def fill_chunks(
    path: Path,
    meta: Meta,
    dataset: Dataset,
    views: int,
    spec: CacheSpec,
    device: torch.device,
    compute: Callable[[torch.Tensor], Computed],
    pack: Pack,
    desc: str,
    progress: bool,
    stored: Callable[[int, int], tuple[Any, Any] | None] | None = None,
) -> int:
    """Compute this rank's missing chunks of a build and write each as soon as its items are done.

    Items are ``(record, view)`` pairs, ``spec.chunk`` to a chunk; ``compute(image)`` gives an item's
    ``(payload, patch boxes)``, and ``pack([payload or None, ...])`` a chunk's own arrays. ``stored(record,
    view)``, when given, returns ``((payload, boxes), objects)`` (or ``(None, failure message)``) for an
    item another cache already holds (it is copied, not decoded), or None. Returns the number of chunks;
    when it returns every rank's chunks exist.
    """
    rank, _ = rank_world()
    items = [(r, v) for r in range(len(dataset.records)) for v in range(views + 1)]
    chunks = [items[i : i + spec.chunk] for i in range(0, len(items), spec.chunk)]
    todo = start_chunks(path, {**meta, "items": len(items), "chunk": spec.chunk}, len(chunks))
    pending: dict[int, list[Any]] = {c: [None] * len(chunks[c]) for c in todo}
    left = {c: len(chunks[c]) for c in todo}  # items of each chunk not yet done

    def write(c: int) -> None:
        _write_chunk(path, c, c * spec.chunk, pending.pop(c), pack)

    flat = []  # (chunk, position in it, item) of the items to decode
    for c in todo:
        for pos, item in enumerate(chunks[c]):
            copied = stored(*item) if stored is not None else None
            if copied is None:
                flat.append((c, pos, item))
            else:
                pending[c][pos], left[c] = copied, left[c] - 1
        if not left[c]:
            write(c)
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
            write(c)
    barrier()
    return len(chunks)


def _write_chunk(path: Path, c: int, first: int, results: list[Any], pack: Pack) -> None:
    """Chunk ``c``: ``results`` per item ``((payload, boxes) or None, objects or failure message)``."""
    save_chunk(
        chunk_path(path, c),
        first,
        [(None if r is None else r[1], info) for r, info in results],
        **pack([None if r is None else r[0] for r, _ in results]),
    )
