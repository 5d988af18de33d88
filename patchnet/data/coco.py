"""COCO detection JSON, read and validated entry by entry (no pycocotools: it crashes on what real exports hold).

Layouts: ``annotations/instances_<split>.json`` with images in ``<split>/`` (COCO itself), a
Roboflow export's ``<split>/_annotations.coco.json`` beside its images, or any file and folder named
directly (``data.annotations``, ``data.images``; ``{split}`` in them is replaced by the split).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

from .images import MAX_PIXELS, DatasetError
from .records import Dataset, Fixes, make_record

ROBOFLOW_FILE = "_annotations.coco.json"


def coco_paths(root: str | Path, split: str, annotations: str = "", images: str = "") -> tuple[Path, Path]:
    """Annotation JSON and image folder of a COCO split.

    ``annotations``/``images`` name them directly (relative paths from ``root``; ``{split}`` is
    replaced; images default to the annotation file's folder). Otherwise, under ``root``:
    ``annotations/instances_<split>.json`` (or ``annotations/<split>.json``) with images in
    ``<split>/`` (or ``images/``), or a Roboflow export's ``<split>/_annotations.coco.json``.
    """
    root = Path(root or ".")
    if annotations:
        ann = root / annotations.replace("{split}", split)
        return ann, (root / images.replace("{split}", split)) if images else ann.parent
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        ann = root / "annotations" / f"{split}.json"
    if not ann.is_file() and (root / split / ROBOFLOW_FILE).is_file():
        ann = root / split / ROBOFLOW_FILE
    folder = root / split if (root / split).is_dir() else root / "images"
    return ann, (root / images.replace("{split}", split)) if images else folder


def _load_json(path: Path):
    if not path.is_file():
        raise DatasetError(
            f"{path}: COCO annotation file does not exist (a COCO root holds "
            "annotations/instances_<split>.json, a Roboflow export <split>/_annotations.coco.json; "
            "or name the file with data.annotations)"
        )
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); JSON files must be UTF-8") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise DatasetError(f"{path}: cannot read a value: {e}") from None
    except (OSError, RecursionError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None


def _entry_id(entry, kind: str, n: int, where: Path):
    """An image or category id: an integer or a non-empty string (JSON keeps their types apart)."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: {kind}[{n}] is not an object: {str(entry)[:80]!r}")
    i = entry.get("id")
    if isinstance(i, bool) or not isinstance(i, (int, str)) or i == "":
        raise DatasetError(f"{where}: {kind}[{n}] has no usable id (an integer or a string), got {i!r}")
    return i


def _index(entries: list, kind: str, where: Path) -> dict:
    """id -> position of the entries of one list; a repeated id is an error naming both entries."""
    out: dict = {}
    for n, entry in enumerate(entries):
        i = _entry_id(entry, kind, n, where)
        if i in out:
            raise DatasetError(f"{where}: {kind}[{out[i]}] and {kind}[{n}] share the id {i!r}")
        out[i] = n
    return out


def _as_text(index: dict) -> dict[str, int]:
    """id as text -> position, for references written as text where the id is a number (or the reverse);
    -1 where two ids read the same."""
    out: dict[str, int] = {}
    for i, n in index.items():
        out[str(i)] = -1 if str(i) in out else n
    return out


def _resolve(ref, index: dict, text: dict[str, int], kind: str, where: str):
    """The entry an annotation refers to: the same id, or (written as text or as a number) the one id
    that reads the same."""
    if not isinstance(ref, bool) and isinstance(ref, (int, str)):
        if ref in index:
            return index[ref]
        if text.get(str(ref), -1) >= 0:
            return text[str(ref)]
    raise DatasetError(f"{where}: refers to {kind} id {ref!r}, which no entry of '{kind}s' has")


def _bbox(ann: dict, where: str) -> tuple[float, float, float, float]:
    b: Any = ann.get("bbox")  # anything: what is not four numbers is refused below
    try:
        values = [float(v) for v in b if isinstance(v, (int, float)) and not isinstance(v, bool)]
    except (TypeError, OverflowError):  # not a list, or an integer too large for a float
        values = []
    if not isinstance(b, (list, tuple)) or len(b) != 4 or len(values) != 4 or not all(map(math.isfinite, values)):
        raise DatasetError(f"{where}: bbox must be [x, y, width, height] (four finite numbers), got {str(b)[:80]}")
    x, y, w, h = values
    return x, y, x + w, y + h


def _categories(data: dict, where: Path) -> list[tuple[object, str]]:
    """(id, name) of every category, ordered by id; duplicate names are an error."""
    cats = data["categories"]
    index = _index(cats, "categories", where)
    names: dict[str, int] = {}
    for i, n in index.items():
        name = cats[n].get("name")
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: categories[{n}] (id {i!r}) has no name")
        if name in names:
            raise DatasetError(
                f"{where}: categories[{names[name]}] and categories[{n}] are both named {name!r}; "
                "rename one (two categories of one name would be merged into one class)"
            )
        names[name] = n
    return sorted(((i, cats[n]["name"]) for i, n in index.items()), key=lambda c: (isinstance(c[0], str), c[0]))


def read_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    classes: list[str] | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> Dataset:
    """Read a COCO detection split; ``iscrowd`` objects count as difficult.

    Without ``classes``, the categories used by an annotation, in id order (an unused one, such as the
    super-category of a Roboflow export, is dropped with a warning).
    """
    where, image_dir = Path(annotation_file), Path(image_dir)
    data = _load_json(where)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("categories"), list)
        or not isinstance(data.get("annotations", []), list)
    ):
        raise DatasetError(
            f"{where}: not a COCO detection file (expected an object with the lists 'images', "
            "'annotations' and 'categories')"
        )
    images = data["images"]
    if not images:
        raise DatasetError(f"{where}: holds no images")
    image_index = _index(images, "images", where)
    cats = _categories(data, where)
    objects, used = _objects(data.get("annotations", []), image_index, cats, where)
    fixes = Fixes()
    classes = _classes(cats, used, classes, where, fixes)
    class_of = {c: classes.index(name) for c, (_, name) in enumerate(cats) if name in classes}
    made = []  # None for an image left out
    ids: dict[str, int] = {}
    for i, n in sorted(image_index.items(), key=lambda e: (isinstance(e[0], str), e[0])):
        at = f"{where}: images[{n}] (id {i!r})"
        if str(i) in ids:
            raise DatasetError(
                f"{at} and images[{ids[str(i)]}] have ids that read the same ({i!r}); make them distinct"
            )
        ids[str(i)] = n
        path, ann_size = _image_entry(images[n], image_dir, at, where)
        kept = [(box, class_of[c], crowd) for box, c, crowd in objects[n] if c in class_of]
        made.append(
            make_record(
                str(i),
                path,
                ann_size,
                [o[0] for o in kept],
                [o[1] for o in kept],
                [o[2] for o in kept],
                len(classes),
                str(where),
                fixes,
                max_pixels=max_pixels,
            )
        )
    records = [r for r in made if r is not None]
    name = f"coco:{where}"
    return Dataset(name, list(classes), records, fixes.report(name))


def _objects(anns: list, image_index: dict, cats: list, where: Path) -> tuple[dict[int, list], set[int]]:
    """Per image position its ``(box, category position, crowd)`` objects, and the categories used."""
    cat_index = {i: n for n, (i, _) in enumerate(cats)}
    image_text, cat_text = _as_text(image_index), _as_text(cat_index)
    objects: dict[int, list] = {n: [] for n in image_index.values()}
    used = set()
    for n, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: annotations[{n}] is not an object")
        at = f"{where}: annotations[{n}] (id {ann.get('id')!r})"
        image = _resolve(ann.get("image_id"), image_index, image_text, "image", at)
        cat = _resolve(ann.get("category_id"), cat_index, cat_text, "category", at)
        objects[image].append((_bbox(ann, at), cat, bool(ann.get("iscrowd", 0))))
        used.add(cat)
    return objects, used


def _classes(cats: list, used: set[int], classes: list[str] | None, where: Path, fixes: Fixes) -> list[str]:
    """``classes`` (checked to be categories), or the categories an annotation uses."""
    names = [name for _, name in cats]
    if classes:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise DatasetError(f"{where}: classes {unknown} are not among its categories: {', '.join(names)}")
        return list(classes)
    for c in sorted(set(range(len(cats))) - used):
        fixes.add("unused_category", f"{cats[c][1]!r} (id {cats[c][0]!r})")
    if not used:
        raise DatasetError(f"{where}: no annotation names a category, so there is no class to learn")
    return [names[c] for c in sorted(used)]


def _image_entry(info: dict, image_dir: Path, at: str, where: Path) -> tuple[Path, tuple[int, int] | None]:
    """An image entry's file (which must exist) and its annotated size, if it gives a usable one."""
    name = info.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{at} has no file_name")
    path = image_dir / name
    if not path.is_file():
        raise DatasetError(f"{where}: names image {name!r} but {path} does not exist")
    width, height = info.get("width"), info.get("height")
    usable = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    return path, cast(tuple[int, int], (width, height)) if usable else None
