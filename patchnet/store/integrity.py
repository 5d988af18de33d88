"""The integrity of a cache folder: its ``meta.json``, each file's recorded size and CRC-32, and the errors
that name a damaged folder and how to rebuild it.

``complete_cache`` writes the record and then the completion marker (``index.npz``, written last: its
presence marks the cache complete); ``open_checked`` checks the sizes on every open and the checksums on
the first open since the machine started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..dist import is_main
from ..errors import PatchnetError
from ..files import atomic_write, file_crc

log = logging.getLogger("patchnet")

Meta = dict[str, Any]  # a meta.json: what a cache was built from, and its files
Files = dict[str, dict[str, int]]  # file name -> its size and CRC-32

MARKER = "index.npz"  # written last by every kind of cache: its presence marks the folder complete


class CacheError(PatchnetError, RuntimeError):
    """A cache folder that is damaged or cannot be written; the message names it and how to rebuild it."""


def damaged(path: Path, problem: str) -> CacheError:
    return CacheError(
        f"cache {path} is damaged: {problem}. Delete the folder to rebuild it (rm -r {path}); the "
        "next run recomputes it. `patchnet cache verify` checks every cache of a folder"
    )


# what reading a damaged file raises (numpy, zip and zlib on torn or flipped bytes)
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def damaged_if_unreadable(path: Path, name: str) -> Iterator[None]:
    try:
        yield
    except UNREADABLE as e:
        raise damaged(path, f"{name} cannot be read ({type(e).__name__}: {e})") from None


def complete(path: Path) -> bool:
    """Whether the cache folder ``path`` is complete (its marker, written last, is there)."""
    return (path / MARKER).is_file()


def read_meta(path: Path) -> Meta:
    with damaged_if_unreadable(path, "meta.json"):
        meta = json.loads((path / "meta.json").read_text())
    if not isinstance(meta, dict) or "fields" not in meta:
        raise damaged(path, "meta.json holds no cache description")
    return meta


def memmap(path: Path, name: str, dtype: np.dtype | type, shape: tuple[int, int]) -> np.ndarray:
    """The rows of file ``name`` of a cache, memory-mapped read-only."""
    if not shape[0]:
        return np.zeros(shape, dtype)
    with damaged_if_unreadable(path, name):
        return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)


def boot_id() -> str:
    """An id of this boot of the machine (Linux), so that a cache is re-verified once after a crash."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def check_files(path: Path, meta: Meta, checksums: bool = False) -> None:
    """Raise ``CacheError`` unless every file ``meta`` records has its size (and, with ``checksums``, its CRC-32)."""
    for name, info in meta.get("files", {}).items():
        f = path / name
        with damaged_if_unreadable(path, name):
            if not f.is_file():
                raise damaged(path, f"{name} is missing")
            size = f.stat().st_size
            if size != info["size"]:
                raise damaged(path, f"{name} is {size} bytes, {info['size']} were written (truncated or replaced)")
            if checksums and file_crc(f) != info["crc32"]:
                raise damaged(path, f"{name} does not match its checksum (its bytes changed after it was written)")


def stamp(path: Path) -> Path:
    """The mark that this machine, in this boot, has checked the cache's checksums (one per machine: a cache on
    shared storage is checked once by each)."""
    return path / f"verified-{boot_id()}"


def open_checked(path: Path) -> Meta:
    """The meta of a complete cache whose file sizes are right; its checksums too on the first open since
    the machine started (after a crash, writes that were not yet on disk would show), by rank 0."""
    meta = read_meta(path)
    check_files(path, meta)
    if meta.get("files") and is_main() and not stamp(path).is_file():
        log.info("cache %s: checking its checksums (first use since the machine started)", path.name)
        check_files(path, meta, checksums=True)
        with contextlib.suppress(OSError):  # a read-only cache is checked again next time
            atomic_write(stamp(path), "")
    return meta


def complete_cache(path: Path, meta: Meta, files: Files, index: bytes) -> None:
    """Record every file's size and checksum in meta.json, then write the marker ``index.npz`` (``index``), whose
    presence marks the cache complete; both fsynced."""
    files = {**files, MARKER: {"size": len(index), "crc32": zlib.crc32(index)}}
    atomic_write(path / "meta.json", json.dumps({**meta, "files": files}, indent=1))
    atomic_write(path / MARKER, index)
    atomic_write(stamp(path), "")
