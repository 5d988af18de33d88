"""The keyed cache folder: its name (``key``: a hash of everything that changes its bytes), the lock under which
one process builds it (``building``), and opening it, built first if it is not complete (``open_or_build``).

Every kind of cache lives in such a folder under ``runtime.cache_dir``: features and unlock's maps at the
top, the per-layer vectors under ``layers/``; single keyed files (PCA projections, int8 ranges) under
their own sub-folder (``keyed_file``).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..dist import barrier, get_world_size, rank_world
from ..files import digest, file_lock
from .integrity import CacheError, complete

CACHE_VERSION = 2  # bump whenever the patch grid or feature code changes what is stored
KINDS = ("", "layers")  # the sub-folders of runtime.cache_dir that hold cache folders ("": the top)

T = TypeVar("T")


def key(fields: dict[str, Any]) -> str:
    """The name of a cache built from ``fields``: 20 hex digits of their hash; any change gives another."""
    return digest(fields)


def keyed_folder(root: Path, fields: dict[str, Any], kind: str = "") -> Path:
    """The cache folder of ``fields`` under ``root`` (``kind``: one of ``KINDS``)."""
    return Path(root) / kind / key(fields)


def keyed_file(root: Path, kind: str, fields: dict[str, Any], suffix: str) -> Path:
    """A cache kept as one file (``<root>/<kind>/<key><suffix>``), written whole by ``atomic_write``."""
    return Path(root) / kind / f"{key(fields)}{suffix}"


def ready(path: Path) -> bool:
    """Whether the cache can be opened without entering ``building``: complete, and not under ``torchrun``,
    whose ranks must all enter it to decide together."""
    return get_world_size() == 1 and complete(path)


_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


@contextlib.contextmanager
def building(path: Path, what: str) -> Iterator[None]:
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


def _remove_stale(path: Path) -> None:
    """Temporary files of a build that was killed (the lock is held: no other process writes here now)."""
    for tmp in [*path.glob(".*.tmp"), *path.glob("chunks/.*.tmp")]:
        tmp.unlink(missing_ok=True)


def open_or_build(path: Path, what: str, build: Callable[[], None], open_: Callable[[Path], T]) -> T:
    """The cache folder ``path`` opened with ``open_``; ``build()`` first, under the lock, unless it is complete
    (another process may have built it while this one waited for the lock)."""
    if ready(path):
        return open_(path)
    with building(path, f"{what} {path.name}"):
        if not complete(path):
            build()
    return open_(path)
