"""Dataset readers (Pascal VOC XML, COCO JSON, image folders, CSV lists) that all produce one ``ImageRecord`` type."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PatchnetError

log = logging.getLogger("patchnet")

EXIF_ORIENTATION = 0x0112


class DatasetError(PatchnetError, ValueError):
    """Input data that cannot be read; the message names the file and the problem."""


@dataclass
class ImageRecord:
    """One image with its boxes (pixel ``x1, y1, x2, y2``, continuous coordinates) and image-level labels."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32
    box_classes: np.ndarray  # (K,) int64
    box_difficult: np.ndarray  # (K,) bool
    labels: np.ndarray  # (C,) int8: 1 present, -1 absent, 0 present only as difficult

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass
class Dataset:
    """A split: its class list, its records, and the fixes made while reading (kind -> files)."""

    name: str
    classes: list[str]
    records: list[ImageRecord]
    fixes: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_boxes(self) -> bool:
        return any(len(r.boxes) for r in self.records)

    @property
    def single_label(self) -> bool:
        """Every image has exactly one class (image folders, MIT-67 style): accuracy is reported too."""
        return bool(self.records) and bool(((self.labels() == 1).sum(1) == 1).all())

    def labels(self) -> np.ndarray:
        """Image-level labels, (N, C) int8."""
        return np.stack([r.labels for r in self.records]) if self.records else np.zeros((0, len(self.classes)), np.int8)


class _Fixes:
    """Counts the repairs made to input data, and logs one line per kind."""

    MESSAGES = {
        "clipped": "boxes extending outside their image were clipped",
        "dropped": "zero-area boxes were dropped",
        "resized": "images whose real size differs from the annotation: the real size is used",
        "unreadable": "images cannot be decoded; they are skipped when features are computed",
        "skipped": "unreadable images without an annotated size were left out",
    }

    def __init__(self) -> None:
        self.files: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, where: str, count: int = 1) -> None:
        if count:
            self.files[kind].extend([where] * count)

    def report(self, name: str) -> dict[str, list[str]]:
        for kind, where in self.files.items():
            log.warning("%s: %d %s (first: %s)", name, len(where), self.MESSAGES[kind], where[0])
        return dict(self.files)


def image_size(path: Path) -> tuple[int, int]:
    """Width and height as displayed, i.e. after the EXIF orientation, read from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot read image header: {e}") from None
    return w, h


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image to RGB uint8 (H, W, 3), honouring EXIF orientation.

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is composited on white.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((255 * arr / max(arr.max(), 1)).astype(np.uint8))
            return np.array(im.convert("RGB"))  # writable, for torch.from_numpy
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode image: {e}") from None


def _clean_boxes(boxes: np.ndarray, width: int, height: int, where: str, fixes: _Fixes) -> np.ndarray:
    """Clip boxes to the image, and return the mask of those with positive area."""
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = np.any(clipped != boxes, axis=1) & keep
    fixes.add("clipped", where, int(moved.sum()))
    fixes.add("dropped", where, int((~keep).sum()))
    boxes[:] = clipped
    return keep


def _labels_from_boxes(classes: np.ndarray, difficult: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.full(num_classes, -1, np.int8)
    labels[classes[difficult]] = 0
    labels[classes[~difficult]] = 1
    return labels


def _make_record(image_id, path, ann_size, boxes, classes, difficult, num_classes, where, fixes, labels=None):
    """A record with cleaned boxes, or None for an unreadable image without an annotated size."""
    try:
        width, height = image_size(path)
    except DatasetError:
        # a corrupt file in a large dataset is skipped (counted), not fatal
        if ann_size is None:
            fixes.add("skipped", str(path))
            return None
        fixes.add("unreadable", str(path))
        width, height = ann_size
    if ann_size is not None and tuple(ann_size) != (width, height):
        fixes.add("resized", where)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int64)
    difficult = np.asarray(difficult, bool)
    keep = _clean_boxes(boxes, width, height, where, fixes)
    boxes, classes, difficult = boxes[keep], classes[keep], difficult[keep]
    if labels is None:
        labels = _labels_from_boxes(classes, difficult, num_classes)
    return ImageRecord(image_id, path, width, height, boxes, classes, difficult, labels)


# --------------------------------------------------------------------------- Pascal VOC


def _read_list(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read list: {e}") from None
    return [ln.split() for ln in lines if ln.strip()]


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
        raise DatasetError(f"{xml_path}: refused unsafe XML ({type(e).__name__}: entities or DTDs are not allowed)") from None
    except SafeET.ParseError as e:
        raise DatasetError(f"{xml_path}: malformed XML: {e}") from None
    size = root.find("size")
    ann_size = None
    if size is not None:
        width, height = _xml_text(size, "width", where), _xml_text(size, "height", where)
        try:
            ann_size = (int(float(width)), int(float(height)))
        except ValueError:
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
        except ValueError:
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


def read_voc(root: str | Path, split: str, classes: list[str]) -> Dataset:
    """Read a VOC-layout split: ``ImageSets/Main/<split>.txt``, ``Annotations/*.xml``, ``JPEGImages/*``.

    Image-level labels come from ``ImageSets/Main/<class>_<split>.txt`` when those exist, and from
    the boxes otherwise.
    """
    root = Path(root)
    if not (root / "Annotations").is_dir() or not (root / "ImageSets" / "Main").is_dir():
        raise DatasetError(f"{root}: not a VOC root (expected Annotations/ and ImageSets/Main/ inside, e.g. VOCdevkit/VOC2007)")
    list_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_path.is_file():
        raise DatasetError(f"{list_path}: split list does not exist; splits here: {', '.join(voc_splits(root)) or 'none'}")
    ids = [row[0] for row in _read_list(list_path)]
    if not ids:
        raise DatasetError(f"{list_path}: split {split!r} is empty")
    class_index = {c: i for i, c in enumerate(classes)}
    image_labels = _read_class_lists(root, split, classes, ids)

    fixes = _Fixes()
    records = []
    for n, image_id in enumerate(ids):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        ann_size, boxes, cls, diff, filename = _parse_voc_xml(xml_path, class_index)
        path = root / "JPEGImages" / f"{image_id}.jpg"
        if not path.is_file() and filename:
            path = root / "JPEGImages" / filename
        if not path.is_file():
            raise DatasetError(f"{list_path}: names image {image_id!r} but {path} does not exist")
        labels = None if image_labels is None else image_labels[n]
        records.append(_make_record(image_id, path, ann_size, boxes, cls, diff, len(classes), str(xml_path),
                                    fixes, labels))
    records = [r for r in records if r is not None]
    name = f"voc:{root}:{split}"
    return Dataset(name, list(classes), records, fixes.report(name))


def _read_class_lists(root: Path, split: str, classes: list[str], ids: list[str]) -> np.ndarray | None:
    paths = [root / "ImageSets" / "Main" / f"{c}_{split}.txt" for c in classes]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = [str(p) for p, ok in zip(paths, present) if not ok]
        raise DatasetError(f"per-class lists for split {split!r} are incomplete; missing {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    row = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(classes)), np.int8)
    seen = np.zeros((len(ids), len(classes)), bool)
    for c, path in enumerate(paths):
        for parts in _read_list(path):
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise DatasetError(f"{path}: line {' '.join(parts)!r} is not '<image id> <1|-1|0>'")
            if parts[0] in row:
                labels[row[parts[0]], c] = int(parts[1])
                seen[row[parts[0]], c] = True
    if not seen.all():
        i, c = np.argwhere(~seen)[0]
        raise DatasetError(f"{paths[c]}: has no label for image {ids[i]!r} of split {split!r}")
    return labels


# --------------------------------------------------------------------------- COCO


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """Annotation JSON and image folder of a COCO-layout split.

    ``annotations/instances_<split>.json`` (or ``annotations/<split>.json``) with images in
    ``<split>/`` (or ``images/``).
    """
    root = Path(root)
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        ann = root / "annotations" / f"{split}.json"
    images = root / split if (root / split).is_dir() else root / "images"
    return ann, images


def read_coco(annotation_file: str | Path, image_dir: str | Path, classes: list[str] | None = None) -> Dataset:
    """Read a COCO JSON split through pycocotools; ``iscrowd`` objects count as difficult."""
    from pycocotools.coco import COCO

    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not annotation_file.is_file():
        raise DatasetError(f"{annotation_file}: COCO annotation file does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(annotation_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{annotation_file}: not valid JSON: {e}") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"{annotation_file}: not a COCO detection file (problem near {e!r})") from None
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if classes:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise DatasetError(f"{annotation_file}: classes {unknown} are not among its categories: {', '.join(names)}")
    else:
        classes = names
    index = {c["id"]: classes.index(c["name"]) for c in cats if c["name"] in classes}

    fixes = _Fixes()
    records = []
    image_ids = sorted(coco.getImgIds())
    if not image_ids:
        raise DatasetError(f"{annotation_file}: holds no images")
    for img_id in image_ids:
        info = coco.loadImgs(img_id)[0]
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise DatasetError(f"{annotation_file}: names image {info['file_name']!r} but {path} does not exist")
        boxes, cls, diff = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)):
            if ann["category_id"] not in index:
                continue
            x, y, w, h = ann["bbox"]
            boxes.append((x, y, x + w, y + h))
            cls.append(index[ann["category_id"]])
            diff.append(bool(ann.get("iscrowd", 0)))
        ann_size = (info["width"], info["height"]) if "width" in info and "height" in info else None
        records.append(_make_record(str(img_id), path, ann_size, boxes, cls, diff, len(classes),
                                    str(annotation_file), fixes))
    records = [r for r in records if r is not None]
    name = f"coco:{annotation_file}"
    return Dataset(name, list(classes), records, fixes.report(name))


# --------------------------------------------------------------------------- image folders and CSV lists

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _box_free_record(image_id: str, path: Path, labels: np.ndarray, where: str, fixes: _Fixes) -> ImageRecord | None:
    empty = np.zeros((0, 4), np.float32)
    return _make_record(image_id, path, None, empty, np.zeros(0, np.int64), np.zeros(0, bool), len(labels), where,
                        fixes, labels)


def _resolve_classes(found: list[str], classes: list[str], where: str) -> list[str]:
    if not classes:
        return sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{where}: classes {', '.join(unknown)} are not in data.classes ({', '.join(classes)}); "
                           "set data.classes: [] to take the classes found in the data")
    return list(classes)


def read_folder(root: str | Path, split: str, classes: list[str] | None = None) -> Dataset:
    """A single-label image folder: ``root/<split>/<class>/*.jpg`` (torchvision's ImageFolder layout)."""
    base = Path(root) / split
    if not base.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise DatasetError(f"{base}: image-folder split does not exist (expected {root}/<split>/<class>/*.jpg); "
                           f"splits here: {', '.join(present) or 'none'}")
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    if not folders:
        raise DatasetError(f"{base}: holds no class folders (expected {base}/<class>/*.jpg)")
    classes = _resolve_classes([f.name for f in folders], list(classes or []), str(base))
    index = {c: i for i, c in enumerate(classes)}
    fixes, records = _Fixes(), []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            log.warning("%s: class folder %s holds no images (%s)", base, folder.name, ", ".join(IMAGE_SUFFIXES))
        for path in files:
            labels = np.full(len(classes), -1, np.int8)
            labels[index[folder.name]] = 1
            records.append(_box_free_record(f"{folder.name}/{path.stem}", path, labels, str(path), fixes))
    records = [r for r in records if r is not None]
    if not records:
        raise DatasetError(f"{base}: no readable images in any class folder")
    name = f"folder:{base}"
    return Dataset(name, classes, records, fixes.report(name))


def read_csv_list(path: str | Path, classes: list[str] | None = None) -> Dataset:
    """A multi-label CSV list: ``image_path,label1;label2`` per line (paths relative to the file's folder).

    An optional first line ``path,labels`` is a header; an empty label field is an image of no class.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: CSV list does not exist (expected lines 'image_path,label1;label2')")
    rows = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or (n == 1 and row[0].strip().lower() in ("path", "image", "file")):
                continue
            if len(row) != 2:
                raise DatasetError(f"{path}, line {n}: expected 'image_path,label1;label2', got {','.join(row)!r}")
            names = [c.strip() for c in row[1].split(";") if c.strip()]
            rows.append((n, row[0].strip(), names))
    if not rows:
        raise DatasetError(f"{path}: lists no images")
    if classes:
        for n, _, names in rows:
            unknown = [c for c in names if c not in classes]
            if unknown:
                raise DatasetError(f"{path}, line {n}: unknown class {unknown[0]!r}; classes: {', '.join(classes)}")
    classes = list(classes) if classes else sorted({c for _, _, names in rows for c in names})
    index = {c: i for i, c in enumerate(classes)}
    fixes, records = _Fixes(), []
    for n, image, names in rows:
        image_path = path.parent / image
        if not image_path.is_file():
            raise DatasetError(f"{path}, line {n}: image {image!r} does not exist ({image_path})")
        labels = np.full(len(classes), -1, np.int8)
        labels[[index[c] for c in names]] = 1
        records.append(_box_free_record(image, image_path, labels, f"{path}, line {n}", fixes))
    records = [r for r in records if r is not None]
    name = f"csv:{path}"
    return Dataset(name, classes, records, fixes.report(name))


def image_label_statistics(dataset: Dataset) -> str:
    """A table of images per class (present, difficult-only) and of labels per image, for ``patchnet inspect``."""
    labels = dataset.labels()
    per_image = (labels == 1).sum(1)
    width = max(len(c) for c in dataset.classes + ["class"])
    lines = [f"{dataset.name}: {len(dataset)} images, {int((per_image == 0).sum())} with no class, "
             f"{per_image.mean():.2f} classes per image (max {per_image.max()}); "
             f"{'single-label' if dataset.single_label else 'multi-label'}, "
             f"{'with' if dataset.has_boxes else 'without'} boxes",
             f"{'class':<{width}}  {'images':>7}  {'difficult-only':>14}"]
    for c, name in enumerate(dataset.classes):
        lines.append(f"{name:<{width}}  {int((labels[:, c] == 1).sum()):>7}  {int((labels[:, c] == 0).sum()):>14}")
    return "\n".join(lines)


def without_boxes(dataset: Dataset) -> Dataset:
    """The same images and image-level labels, with every box dropped (``data.boxes: false``)."""
    empty = np.zeros((0, 4), np.float32)
    records = [replace(r, boxes=empty, box_classes=np.zeros(0, np.int64), box_difficult=np.zeros(0, bool))
               for r in dataset.records]
    return Dataset(dataset.name, dataset.classes, records, dataset.fixes)


def data_override(cfg, root: str | Path | None = None, fmt: str | None = None):
    """A copy of a recipe's data section with another root and/or format (the CLI's --data/--format)."""
    if root is None and fmt is None:
        return cfg
    return replace(cfg, root=str(root) if root is not None else cfg.root, format=fmt or cfg.format)


def open_split(cfg, split: str) -> Dataset:
    """The split ``split`` of the recipe's data section (generating the demo set when needed)."""
    if cfg.format == "demo":
        from .demo import DEMO_CLASSES, make_demo

        dataset = read_voc(make_demo(cfg.root or "data/demo"), split, DEMO_CLASSES)
    elif not cfg.root:
        raise DatasetError("data.root is empty; set it to a VOC root (VOCdevkit/VOC2007) or a COCO folder, "
                           "e.g. --set data.root=/path/to/VOCdevkit/VOC2007")
    elif cfg.format == "voc":
        dataset = read_voc(cfg.root, split, cfg.classes)
    elif cfg.format == "coco":
        dataset = read_coco(*coco_paths(cfg.root, split), classes=cfg.classes or None)
    elif cfg.format == "folder":
        dataset = read_folder(cfg.root, split, cfg.classes)
    elif cfg.format == "csv":
        dataset = read_csv_list(Path(cfg.root) / f"{split}.csv", cfg.classes)
    else:
        raise DatasetError(f"data.format must be voc, coco, demo, folder or csv; got {cfg.format!r}")
    if not getattr(cfg, "boxes", True):
        dataset = without_boxes(dataset)
    if cfg.limit and cfg.limit < len(dataset):
        dataset = Dataset(f"{dataset.name} (first {cfg.limit})", dataset.classes, dataset.records[:cfg.limit], dataset.fixes)
    return dataset
