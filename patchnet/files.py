"""Writing files safely: atomic, fsynced writes; one lock per cache key; user names made safe as file names.

The files patchnet writes (checkpoints, cache chunks, rows and indexes, tables, figures, pages) go
through ``atomic_write``: a temporary file unique to the process, flushed and fsynced, renamed over the
target, then the folder fsynced, so a kill or a power loss leaves either the old file or the new one.
Every name that comes from the user's data (an image id, a class name) becomes a file name through
``safe_name`` only, and every such path is checked to lie under its output folder by ``output_path``.
Every name that reaches text (a page, a title, a printed line, CSV) goes through ``printable``, and every
JSON document through ``json_text``: a file name that is not UTF-8 shows its odd bytes as ``\\xNN``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import PatchnetError

log = logging.getLogger("patchnet")

MAX_NAME = 160  # UTF-8 bytes of a safe name, hash suffix included (file systems allow 255, temporary names add ~30)
_UNSAFE = re.compile(r"[^\w.+=-]+")  # anything but letters, digits, _ . + = - (Unicode letters are kept)
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


class OutputPathError(PatchnetError, ValueError):
    """A derived output path that would leave its output folder."""


def safe_name(name: str, max_len: int = MAX_NAME) -> str:
    """A file name for a user-supplied id or class name: no separators, no ``..``, no NUL, bounded length.

    Letters, digits and ``_ . + = -`` are kept; every other run of characters becomes ``_``, and
    leading dots go (no hidden files, no ``..``). A name that had to change gets a short hash of the
    original, so that two names that differ (``a/b`` and ``a_b``) stay distinct.
    """
    text = unicodedata.normalize("NFC", str(name))
    cleaned = _UNSAFE.sub("_", text).strip("._ ") or "_"
    reserved = cleaned.split(".")[0].lower() in _WINDOWS_RESERVED
    if cleaned == text and not reserved and len(cleaned.encode()) <= max_len:
        return cleaned
    return f"{_cut(cleaned, max_len - 9).rstrip('._ ') or '_'}-{_short_hash(text)}"


def printable(text: object) -> str:
    """``text`` (a path, a file name, a message naming one) as it can be printed and written as UTF-8.

    Python holds the bytes of a file name that is not UTF-8 as lone surrogates (``os.fsdecode``), which no
    UTF-8 file, terminal or strict JSON reader takes: they become ``\\xNN`` escapes of the name's bytes.
    """
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that no file name's bytes make
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_tree(value):
    """A JSON-able value with every string in it (keys too) made ``printable``."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: printable_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_tree(v) for v in value]
    return value


def json_text(value, **dumps) -> str:
    """``json.dumps`` of a value whose strings are made ``printable`` first: strict JSON, no lone surrogates."""
    return json.dumps(printable_tree(value), **dumps)


def _cut(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes (never half a character)."""
    return text.encode()[:max_bytes].decode(errors="ignore")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


class UniqueNames:
    """``safe_name`` for the files of one output folder: two different names never get the same file name,
    even on a case-insensitive disk (the later one gets a hash suffix)."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}  # lower-cased file name -> the name it was made from

    def __call__(self, name: str) -> str:
        out, salt = safe_name(name), 0
        while self.owner.setdefault(out.lower(), name) != name:  # taken by another name: rehash until free
            salt += 1
            out = f"{_cut(safe_name(name), MAX_NAME - 9)}-{_short_hash(f'{name}#{salt}')}"
        return out


def output_path(out: str | Path, name: str, suffix: str = "", names: UniqueNames | None = None) -> Path:
    """``out / (safe_name(name) + suffix)`` (through ``names`` when given), checked to lie under ``out``."""
    path = Path(out) / ((names or safe_name)(name) + suffix)
    return check_inside(out, path)


def check_inside(out: str | Path, path: str | Path) -> Path:
    """Raise unless ``path`` (resolved, links followed) lies under the folder ``out``; returns ``path``."""
    root, target = Path(out).resolve(), Path(path).resolve()
    if target != root and root not in target.parents:
        raise OutputPathError(
            f"{path} would be written outside its output folder {out} (it resolves to {target}); "
            "a link inside the output folder points elsewhere, or a name escaped it"
        )
    return Path(path)


def digest(value) -> str:
    """20 hex digits of the SHA-256 of a JSON-able value (keys sorted): the names of caches and projections."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- atomic writes


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(target: str | Path) -> Path:
    """A name beside ``target`` that no other process or call uses: ``.<name>.<pid>.<random>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file to write; on success it is fsynced and renamed over ``target``, on error removed.
    The folder is created if needed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def atomic_write(target: str | Path, write: Callable[[BinaryIO], object] | bytes | str) -> Path:
    """Write ``target`` atomically: ``write(file)``, or the given bytes or text (UTF-8, made ``printable``)."""
    with atomic_file(target) as f:
        if callable(write):
            write(f)
        else:
            f.write(printable(write).encode("utf-8") if isinstance(write, str) else write)
    return Path(target)


def file_crc(path: str | Path, block: int = 1 << 24) -> int:
    """CRC-32 of a file's bytes, read in blocks (a fast checksum: about 1 GB/s)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


# --------------------------------------------------------------------------- locks

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builds of one cache key are not guarded there
    fcntl = None  # type: ignore[assignment]


class LockHeld(PatchnetError, RuntimeError):
    """``file_lock(..., wait=False)`` found the lock held by another process (``holder``: its pid, or ``?``)."""

    def __init__(self, path: Path, what: str, holder: str):
        super().__init__(f"{what} is in use by another process (pid {holder}); lock file {path}")
        self.path, self.what, self.holder = path, what, holder


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, poll: float = 1.0, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block.

    A second process asking for the same lock logs once that it waits for the first (naming ``what``
    and the holder's pid) and blocks until it is released; with ``wait=False`` it raises ``LockHeld``
    at once instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        log.warning(
                            "%s: this file system has no locks (%s); two processes building %s at once "
                            "would not wait for each other",
                            path.parent,
                            e.strerror,
                            what,
                        )
                        break
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not wait:
                    raise LockHeld(path, what, holder)
                if not waited:
                    log.info("waiting for another process (pid %s) that is building %s", holder, what)
                    waited = True
                time.sleep(poll)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
