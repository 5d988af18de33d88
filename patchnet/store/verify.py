"""``patchnet cache verify``: every cache folder of a ``runtime.cache_dir`` (features, unlock's maps, the
per-layer vectors) checked against the sizes and checksums recorded when it was written."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..files import atomic_write
from .chunks import chunk_problem
from .folder import KINDS
from .integrity import CacheError, check_files, complete, read_meta, stamp


def cache_folders(root: Path) -> Iterator[Path]:
    """Every cache folder under ``root`` (a ``runtime.cache_dir``), complete or not, in a stable order."""
    for kind in KINDS:
        folder = Path(root) / kind
        if folder.is_dir():
            yield from sorted(p for p in folder.iterdir() if p.is_dir() and (p / "meta.json").is_file())


def verify_cache(path: Path) -> str:
    """``ok`` for a complete cache whose sizes and checksums hold, ``incomplete (...)`` for a build in progress
    or killed, or the problem; damaged chunk files of an incomplete build are listed (a rebuild redoes them)."""
    path = Path(path)
    if not complete(path):
        chunks = sorted((path / "chunks").glob("*.npz")) if (path / "chunks").is_dir() else []
        bad = [c.name for c in chunks if chunk_problem(c)]
        return f"incomplete ({len(chunks)} chunks done" + (f", damaged: {', '.join(bad)})" if bad else ")")
    try:
        meta = read_meta(path)
        if not meta.get("files"):
            return "ok (written before checksums were kept: sizes and checksums not checked)"
        check_files(path, meta, checksums=True)
        with contextlib.suppress(OSError):
            atomic_write(stamp(path), "")
    except CacheError as e:
        return str(e).split(" is damaged: ", 1)[-1].split(". Delete", 1)[0]
    return "ok"
