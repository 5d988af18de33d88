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
                f"raise the limit, e.g. --set data.max_pixels={w * h} (predict: --max-pixels {w * h}; "
                f"at most {PILLOW_LIMIT})"
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

    Grayscale, palette, CMYK, 16-bit, 32-bit and float images are converted (``_eight_bits``); transparency is
    composited on white.
    ``max_pixels``: refuse larger images before decoding (None: Pillow's limit only; the readers
    have already dropped the images of a dataset that exceed ``data.max_pixels``).
    """
    with open_image(path, max_pixels) as im:
        try:
            tags = getattr(im, "tag_v2", None)  # a TIFF's sample format, which the transpose drops
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            elif im.mode in HIGH_DEPTH:
                im = Image.fromarray(_eight_bits(im, tags))
            return np.array(im.convert("RGB"))  # writable, for torch.from_numpy
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path}: cannot decode image: {e}") from None


HIGH_DEPTH = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def _eight_bits(im: Image.Image, tags=None) -> np.ndarray:
    """A single-channel image of more than 8 bits as uint8, mapped by the range of its type, never by its own
    maximum (a dark 16-bit image stays dark): I;16 by [0, 65535]; I (32-bit) by [0, 2^32 - 1] where the TIFF says
    its samples are unsigned, else [0, 2^31 - 1] with negatives black, or by its BitsPerSample where fewer; F
    (float) by [0, 1], clipped, NaN black. ``tags``: the TIFF tags of the file it was read from (``tag_v2``)."""
    arr = np.asarray(im)
    if im.mode == "F":
        unit = np.nan_to_num(arr.astype(np.float64), nan=0.0)
    elif im.mode.startswith("I;16"):
        unit = arr / np.iinfo(arr.dtype).max
    else:
        tags = tags or {}
        bits = int(max(np.atleast_1d(tags.get(258, 32 if tags else 16))))  # mode I outside TIFF: 16-bit samples
        signed = np.atleast_1d(tags.get(339, 1))[0] == 2  # TIFF's SampleFormat: 1 unsigned (its default), 2 signed
        if bits > 16 and not signed:  # Pillow reads unsigned 32-bit samples as signed: above 2^31 they wrap negative
            arr = arr.view(np.uint32)
        unit = arr / (2 ** (min(bits, 32) - signed) - 1)
    return (np.clip(unit, 0.0, 1.0) * 255).round().astype(np.uint8)


def thumbnail(path: str | Path, size: int, max_pixels: int | None = None) -> Image.Image:
    """An RGB thumbnail of at most ``size`` pixels a side; JPEGs decode at a reduced scale (much faster)."""
    with open_image(path, max_pixels) as im:
        try:
            im.draft("RGB", (size, size))
            tags = getattr(im, "tag_v2", None)
            im = ImageOps.exif_transpose(im)
            im = (Image.fromarray(_eight_bits(im, tags)) if im.mode in HIGH_DEPTH else im).convert("RGB")
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
