"""Box-free datasets: image folders (``root/<split>/<class>/...``, single-label) and CSV lists (multi-label)."""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from pathlib import Path

import numpy as np

from .images import IMAGE_SUFFIXES, MAX_PIXELS, DatasetError, is_hidden, walk_images
from .records import Dataset, Fixes, box_free_record, resolve_classes

log = logging.getLogger("patchnet")


def read_folder(
    root: str | Path, split: str, classes: list[str] | None = None, max_pixels: int | None = MAX_PIXELS
) -> Dataset:
    """A single-label image folder: ``root/<split>/<class>/**/*.jpg`` (torchvision's ImageFolder layout).

    Images in sub-folders belong to their class folder; hidden files and folders (``.DS_Store``,
    ``._x.jpg``, ``.ipynb_checkpoints``, ``.git``) are skipped. An image's id is its path under the
    split, extension included (``cat/a.jpg`` and ``cat/a.png`` are two images).
    """
    base = Path(root) / split
    if not base.is_dir():
        present = (
            sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not is_hidden(p.name))
            if Path(root).is_dir()
            else []
        )
        raise DatasetError(
            f"{base}: image-folder split does not exist (expected {root}/<split>/<class>/*.jpg); "
            f"splits here: {', '.join(present) or 'none'}"
        )
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not is_hidden(p.name))
    if not folders:
        raise DatasetError(f"{base}: holds no class folders (expected {base}/<class>/*.jpg)")
    loose = [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p.name)]
    if loose:
        log.warning(
            "%s: %d images lie outside every class folder and are left out (first: %s)", base, len(loose), loose[0].name
        )
    classes = resolve_classes([f.name for f in folders], list(classes or []), str(base))
    index = {c: i for i, c in enumerate(classes)}
    fixes, made = Fixes(), []  # made: None for an image left out
    for folder in folders:
        files = walk_images(folder, base)
        if not files:
            log.warning("%s: class folder %s holds no images (%s)", base, folder.name, ", ".join(IMAGE_SUFFIXES))
        for path in files:
            labels = np.full(len(classes), -1, np.int8)
            labels[index[folder.name]] = 1
            image_id = posixpath.join(folder.name, *path.relative_to(folder).parts)
            made.append(box_free_record(image_id, path, labels, str(path), fixes, max_pixels))
    records = [r for r in made if r is not None]
    if not records:
        raise DatasetError(f"{base}: no readable images in any class folder")
    name = f"folder:{base}"
    return Dataset(name, classes, records, fixes.report(name))


HEADER_WORDS = {
    "path",
    "image",
    "file",
    "filename",
    "file_name",
    "image_path",
    "img",
    "labels",
    "label",
    "classes",
    "class",
}


def _csv_text(path: Path) -> str:
    """The text of a CSV list: UTF-8 (with or without Excel's BOM) or UTF-16 with a BOM; anything else is an
    error naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: starts like UTF-16 but does not decode as it; save it as UTF-8") from None
    if raw[:200].count(b"\0") > 20:
        raise DatasetError(
            f"{path}: looks like UTF-16 without a byte-order mark; save it as UTF-8 "
            "(Excel: 'CSV UTF-8 (comma delimited)')"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(
            f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}; a Latin-1 or Windows-1252 "
            "file?); save it as UTF-8 (Excel: 'CSV UTF-8 (comma delimited)')"
        ) from None


def read_csv_list(path: str | Path, classes: list[str] | None = None, max_pixels: int | None = MAX_PIXELS) -> Dataset:
    """A multi-label CSV list: ``image_path,label1;label2`` per line (paths relative to the file's folder).

    An optional first line such as ``path,labels`` is a header; an empty label field is an image of no
    class. A line repeating an earlier one is dropped (counted); the same image with other labels is
    an error naming both lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: CSV list does not exist (expected lines 'image_path,label1;label2')")
    fixes = Fixes()
    rows = _csv_rows(path, fixes)
    if classes:
        for n, names in rows.values():
            unknown = [c for c in names if c not in classes]
            if unknown:
                raise DatasetError(f"{path}, line {n}: unknown class {unknown[0]!r}; classes: {', '.join(classes)}")
    classes = list(classes) if classes else sorted({c for _, names in rows.values() for c in names})
    if not classes:
        raise DatasetError(
            f"{path}: no line names a class (the second column holds class names separated by ';'), "
            "so there is nothing to learn"
        )
    index = {c: i for i, c in enumerate(classes)}
    made = []  # None for an image left out
    for image, (n, names) in rows.items():
        image_path = path.parent / image
        if not image_path.is_file():
            raise DatasetError(f"{path}, line {n}: image {image!r} does not exist ({image_path})")
        labels = np.full(len(classes), -1, np.int8)
        labels[[index[c] for c in names]] = 1
        made.append(box_free_record(image, image_path, labels, f"{path}, line {n}", fixes, max_pixels))
    records = [r for r in made if r is not None]
    name = f"csv:{path}"
    return Dataset(name, classes, records, fixes.report(name))


def _csv_rows(path: Path, fixes: Fixes) -> dict[str, tuple[int, list[str]]]:
    """image path -> (line number, class names) of a CSV list; repeated lines dropped (counted)."""
    try:
        lines = list(csv.reader(io.StringIO(_csv_text(path), newline="")))
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV file: {e}") from None
    rows: dict[str, tuple[int, list[str]]] = {}
    for n, row in enumerate(lines, 1):
        if not row or not "".join(row).strip() or (n == 1 and row[0].strip().lower() in HEADER_WORDS):
            continue
        if len(row) != 2:
            hint = (
                "; its columns seem separated by ';' (Excel in some locales): save it comma-separated"
                if len(row) == 1 and row[0].count(";") >= 1 and n == 1
                else ""
            )
            raise DatasetError(f"{path}, line {n}: expected 'image_path,label1;label2', got {','.join(row)!r}{hint}")
        if not row[0].strip():
            raise DatasetError(f"{path}, line {n}: the image path is empty")
        image = posixpath.normpath(row[0].strip().replace("\\", "/"))
        names = sorted({c.strip() for c in row[1].split(";") if c.strip()})
        if image in rows:
            first, theirs = rows[image]
            if theirs != names:
                raise DatasetError(
                    f"{path}, lines {first} and {n}: image {image!r} is listed twice with different "
                    f"labels ({';'.join(theirs) or 'none'} and {';'.join(names) or 'none'}); "
                    "merge them into one line"
                )
            fixes.add("duplicate", f"{path}, line {n}")
            continue
        rows[image] = (n, names)
    if not rows:
        raise DatasetError(f"{path}: lists no images")
    return rows
