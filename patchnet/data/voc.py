"""Pascal VOC layout: ``ImageSets/Main/<split>.txt``, ``Annotations/*.xml`` (defusedxml), ``JPEGImages/``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from .images import MAX_PIXELS, DatasetError
from .records import Dataset, Fixes, make_record


def read_list(path: Path) -> list[list[str]]:
    """The whitespace-separated fields of each non-empty line of a text list (UTF-8, BOM allowed)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read list: {e}") from None
    return [ln.split() for ln in lines if ln.strip()]


@overload
def _xml_text(node, tag: str, where: str, required: Literal[True] = True) -> str: ...
@overload
def _xml_text(node, tag: str, where: str, required: bool) -> str | None: ...
def _xml_text(node, tag: str, where: str, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DatasetError(f"{where}: missing <{tag}>")
        return None
    return child.text.strip()


def _parse_voc_xml(xml_path: Path, class_index: dict[str, int]):
    where = str(xml_path)
    if not xml_path.is_file():
        raise DatasetError(f"{xml_path}: annotation file does not exist")
    try:
        root = SafeET.parse(str(xml_path)).getroot()
    except DefusedXmlException as e:
        raise DatasetError(
            f"{xml_path}: refused unsafe XML ({type(e).__name__}: entities or DTDs are not allowed)"
        ) from None
    except SafeET.ParseError as e:
        raise DatasetError(f"{xml_path}: malformed XML: {e}") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{xml_path}: cannot read annotation: {e}") from None
    size = root.find("size")
    ann_size = None
    if size is not None:
        width, height = _xml_text(size, "width", where), _xml_text(size, "height", where)
        try:
            ann_size = (int(float(width)), int(float(height)))
        except (ValueError, OverflowError):
            raise DatasetError(f"{xml_path}: <size> holds a non-numeric width or height") from None
    boxes, classes, difficult = [], [], []
    for obj in root.iter("object"):
        name = _xml_text(obj, "name", where)
        if name not in class_index:
            raise DatasetError(
                f"{xml_path}: unknown class {name!r}; accepted classes: {', '.join(class_index)}. "
                "Set data.classes in the recipe to this dataset's class list."
            )
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{xml_path}: object {name!r} has no <bndbox>")
        coords = [_xml_text(bb, t, where) for t in ("xmin", "ymin", "xmax", "ymax")]
        flag = _xml_text(obj, "difficult", where, required=False) or "0"
        try:
            x1, y1, x2, y2 = (float(c) for c in coords)
            diff = int(float(flag))
        except (ValueError, OverflowError):
            raise DatasetError(f"{xml_path}: object {name!r} has a non-numeric coordinate or difficult flag") from None
        # VOC pixels are 1-based and inclusive: pixel i covers [i-1, i] in continuous coordinates.
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        classes.append(class_index[name])
        difficult.append(diff != 0)
    filename = _xml_text(root, "filename", where, required=False)
    return ann_size, boxes, classes, difficult, filename


def voc_splits(root: str | Path) -> list[str]:
    """The split lists present in ``ImageSets/Main``."""
    main = Path(root) / "ImageSets" / "Main"
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)


def voc_classes(root: str | Path, split: str) -> list[str]:
    """The classes of a VOC-layout split: those of its per-class lists (``<class>_<split>.txt``), else the object
    names in its annotations (an annotation that cannot be read is left to ``read_voc`` to report). VOC's own
    20 classes come in VOC's order, any others sorted."""
    from ..recipe import VOC_CLASSES

    main = Path(root) / "ImageSets" / "Main"
    found = {p.name[: -len(f"_{split}.txt")] for p in main.glob(f"*_{split}.txt")}
    if not found and (main / f"{split}.txt").is_file():
        for row in read_list(main / f"{split}.txt"):
            try:
                tree = SafeET.parse(str(Path(root) / "Annotations" / f"{row[0]}.xml"))
            except (DefusedXmlException, SafeET.ParseError, OSError, ValueError):
                continue
            found |= {(obj.findtext("name") or "").strip() for obj in tree.getroot().iter("object")} - {""}
    if found <= set(VOC_CLASSES) and len(found) > 10:  # VOC itself (or most of it): its 20 classes in its order
        return list(VOC_CLASSES)
    return sorted(found)


def read_voc(root: str | Path, split: str, classes: list[str], max_pixels: int | None = MAX_PIXELS) -> Dataset:
    """Read a VOC-layout split: ``ImageSets/Main/<split>.txt``, ``Annotations/*.xml``, ``JPEGImages/*``.

    Image-level labels come from ``ImageSets/Main/<class>_<split>.txt`` when those exist, and from
    the boxes otherwise. An id listed twice is read once (counted).
    """
    root = Path(root)
    if not (root / "Annotations").is_dir() or not (root / "ImageSets" / "Main").is_dir():
        raise DatasetError(
            f"{root}: not a VOC root (expected Annotations/ and ImageSets/Main/ inside, e.g. VOCdevkit/VOC2007)"
        )
    list_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_path.is_file():
        raise DatasetError(
            f"{list_path}: split list does not exist; splits here: {', '.join(voc_splits(root)) or 'none'}"
        )
    fixes = Fixes()
    ids = list(dict.fromkeys(row[0] for row in read_list(list_path)))
    fixes.add("duplicate", str(list_path), len(read_list(list_path)) - len(ids))
    if not ids:
        raise DatasetError(f"{list_path}: split {split!r} is empty")
    class_index = {c: i for i, c in enumerate(classes)}
    image_labels = _read_class_lists(root, split, classes, ids)

    made = []  # None for an image left out
    for n, image_id in enumerate(ids):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        ann_size, boxes, cls, diff, filename = _parse_voc_xml(xml_path, class_index)
        path = root / "JPEGImages" / f"{image_id}.jpg"
        if not path.is_file() and filename:
            path = root / "JPEGImages" / filename
        if not path.is_file():
            raise DatasetError(f"{list_path}: names image {image_id!r} but {path} does not exist")
        labels = None if image_labels is None else image_labels[n]
        made.append(
            make_record(
                image_id, path, ann_size, boxes, cls, diff, len(classes), str(xml_path), fixes, labels, max_pixels
            )
        )
    records = [r for r in made if r is not None]
    name = f"voc:{root}:{split}"
    return Dataset(name, list(classes), records, fixes.report(name))


def _read_class_lists(root: Path, split: str, classes: list[str], ids: list[str]) -> np.ndarray | None:
    paths = [root / "ImageSets" / "Main" / f"{c}_{split}.txt" for c in classes]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = [str(p) for p, ok in zip(paths, present) if not ok]
        raise DatasetError(
            f"per-class lists for split {split!r} are incomplete; missing {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    row = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(classes)), np.int8)
    seen = np.zeros((len(ids), len(classes)), bool)
    for c, path in enumerate(paths):
        for parts in read_list(path):
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise DatasetError(f"{path}: line {' '.join(parts)!r} is not '<image id> <1|-1|0>'")
            if parts[0] in row:
                i = row[parts[0]]
                if seen[i, c] and labels[i, c] != int(parts[1]):
                    raise DatasetError(f"{path}: image {parts[0]!r} is listed twice with different labels")
                labels[i, c] = int(parts[1])
                seen[i, c] = True
    if not seen.all():
        i, c = np.argwhere(~seen)[0]
        raise DatasetError(f"{paths[c]}: has no label for image {ids[i]!r} of split {split!r}")
    return labels
