"""The row files of a cache: written in one pass of plain appends, from the chunks of a build or from another
cache (``transcode``), each file's size and CRC-32 computed as it is written."""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np

from ..files import atomic_write, temporary_name
from .chunks import INDEX_ARRAYS, chunk_arrays, chunk_rows, finish_join
from .codec import FeatureCodec
from .integrity import MARKER, Files, Meta, complete_cache
from .readers import FeatureStore, row_file

Layout = dict[str, tuple[np.dtype, int]]  # stored array name -> (dtype, width)


def write_rows(path: Path, layout: Layout, total: int, blocks: Iterable[dict[str, np.ndarray]]) -> Files:
    """Write ``total`` rows of each stored array from ``blocks`` (dicts of consecutive rows); returns each
    file's size and CRC-32, computed as it is written.

    Plain appends, not a writable memory map: the dirty pages of a map count as the process's resident
    memory until they are written back, which made the peak memory of a build grow with the dataset.
    """
    files = {name: path / row_file(name, dtype) for name, (dtype, _) in layout.items()}
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


def join_chunks(path: Path, num_chunks: int, layout: Layout, what: str) -> None:
    """Join the chunks of a build whose items hold rows of ``layout`` (``counts`` rows each) into the row files
    and the item index, and mark the cache complete."""
    parts = chunk_arrays(path, num_chunks, INDEX_ARRAYS)
    total = int(sum(c.sum() for c in parts["counts"]))
    files = write_rows(path, layout, total, chunk_rows(path, num_chunks, layout))
    finish_join(path, parts, what, files)


def transcode(source: FeatureStore, codec: FeatureCodec, path: Path, meta: Meta, block: int = 65536) -> None:
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
    complete_cache(path, {**meta, "failures": source.failures}, files, (source.path / MARKER).read_bytes())


def save_projection(path: Path, codec: FeatureCodec) -> None:
    """The projection beside the rows, so that a store maps them back on its own (``trunk_rows``)."""
    if codec.components is not None:
        mean, components = cast(np.ndarray, codec.mean), codec.components  # the mean is set with the components
        atomic_write(path / "projection.npz", lambda f: np.savez(f, mean=mean, components=components))
