"""Decoding images safely: a pixel limit read from the header before any decoding, EXIF turned upright,
every mode converted to RGB, and every failure one ``DatasetError`` that names the file."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PatchnetError
from ..recipe import MAX_PIXELS, PILLOW_LIMIT

log = logging.getLogger("patchnet")

EXIF_ORIENTATION = 0x0112
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(PatchnetError, ValueError):
    """Input data that cannot be read; the message names the file and the problem."""


class ImageTooLarge(DatasetError):
    """An image whose header claims more pixels than the limit; it is never decoded."""


def is_hidden(name: str) -> bool:
    """Entries a file manager hides or an OS adds: ``.DS_Store``, ``._x.jpg``, ``.git``, ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Iterator[Image.Image]:
    """A lazily opened image (nothing decoded yet) whose header has passed the pixel limit.

    ``max_pixels`` None: only Pillow's own limit. Pillow's decompression-bomb warning is silenced
    here (the limit checks the same thing first) and its error becomes an ``ImageTooLarge``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file does not exist") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(
            f"{path}: refused: its header claims more than {PILLOW_LIMIT / 1e6:.0f} M pixels, "
            f"Pillow's decompression-bomb limit ({e})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot read image header: {e}") from None
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(
                f"{path}: {w}x{h} is {w * h / 1e6:.1f} M pixels, over data.max_pixels "
                f"({max_pixels / 1e6:.1f} M); skipped without decoding. If the image is genuine, "
                f"raise the limit, e.g. --set data.max_pixels={w * h} (at most {PILLOW_LIMIT})"
            )
        yield im


def image_size(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """Width and height as displayed, i.e. after the EXIF orientation, read from the header only."""
    with open_image(path, max_pixels) as im:
        w, h = im.size
        try:
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        except Exception:  # a damaged EXIF block: the stored orientation
            turned = False
    return (h, w) if turned else (w, h)


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image to RGB uint8 (H, W, 3), honouring EXIF orientation.

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is composited on white.
    ``max_pixels``: refuse larger images before decoding (None: Pillow's limit only; the readers
    have already dropped the images of a dataset that exceed ``data.max_pixels``).
    """
    with open_image(path, max_pixels) as im:
        try:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((255 * arr / max(arr.max(), 1)).astype(np.uint8))
            return np.array(im.convert("RGB"))  # writable, for torch.from_numpy
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path}: cannot decode image: {e}") from None


def thumbnail(path: str | Path, size: int, max_pixels: int | None = None) -> Image.Image:
    """An RGB thumbnail of at most ``size`` pixels a side; JPEGs decode at a reduced scale (much faster)."""
    with open_image(path, max_pixels) as im:
        try:
            im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            return im
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path}: cannot decode image: {e}") from None


def image_files(paths: list[Path]) -> list[Path]:
    """The paths given, with each folder replaced by the image files under it at any depth (``photos/`` of class
    folders too; hidden entries skipped), in order.

    Paths that are not folders are kept as given: a missing or unreadable file fails when it is
    loaded, on its own.
    """
    files = []
    for p in paths:
        files += walk_images(p, p) if p.is_dir() else [p]
    return files


def walk_images(folder: Path, where: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, as torchvision's ImageFolder finds them: links followed,
    each real folder visited once (a link back up is skipped with a warning), hidden entries skipped."""
    out, seen = [], set()

    def unreadable(e: OSError) -> None:
        log.warning("%s: cannot read %s (%s); its images are left out", where, e.filename, e.strerror)

    for top, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(top)
        if real in seen:
            log.warning("%s: %s leads back to a folder already read (a link loop?); skipped", where, top)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        out += [
            Path(top) / f
            for f in sorted(files)  # regular files only: a FIFO would block the decoder
            if not is_hidden(f) and Path(f).suffix.lower() in IMAGE_SUFFIXES and (Path(top) / f).is_file()
        ]
    return out
