"""What a user's folder holds: its format, its splits, and whether it has boxes, found from the folder alone.

``detect_layout(root)`` recognises the layouts people have (DESIGN.md, "A practitioner's first five
minutes"): a VOC devkit (the year folder, or ``VOCdevkit/`` above one), COCO (``annotations/instances_<split>.json``
or a Roboflow export's ``<split>/_annotations.coco.json``), CSV lists (``<split>.csv``), an ImageFolder
(``<split>/<class>/``) and a plain folder of class folders with no splits. A folder that matches two
layouts, or whose folders could be splits or classes, is an error saying what was seen and which option
decides. Nothing here reads an image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .coco import ROBOFLOW_FILE
from .images import IMAGE_SUFFIXES, DatasetError, is_hidden
from .voc import voc_classes, voc_splits

# Split names as people write them, in the order a run prefers them.
TRAIN_NAMES = ("train", "training", "trainval")
VAL_NAMES = ("val", "valid", "validation", "dev")
TEST_NAMES = ("test", "testing")
SPLIT_NAMES = (*TRAIN_NAMES, *VAL_NAMES, *TEST_NAMES)
FORMATS = ("voc", "coco", "csv", "folder")
NO_SPLIT = "."  # data.train_split of a folder of class folders: the root itself
VAL_SHARE = 0.1  # held out of the training split as the val split where the data has none
HELD_OUT_VAL = "val"  # the name that held-out share goes by (patchnet eval --split val)


@dataclass
class Layout:
    """A dataset's layout as found on disk: everything the ``data`` section of a recipe needs."""

    format: str  # voc | coco | csv | folder
    root: Path  # what the reader is given (VOC: the year folder)
    splits: list[str]  # every split found, in the order found
    train_split: str
    val_split: str  # "" where there is none and none is held out
    val_from_train: float = 0.0  # share of train_split held out as the val split (the data has none)
    boxes: bool = False
    classes: list[str] = field(default_factory=list)  # [] = those the reader finds (VOC: from its lists or XML)
    notes: list[str] = field(default_factory=list)  # what else was seen, for the table

    def data_values(self) -> dict[str, Any]:
        """The recipe's ``data`` section for this layout."""
        return {
            "format": self.format,
            "root": str(self.root),
            "train_split": self.train_split,
            "val_split": self.val_split,
            "val_from_train": self.val_from_train,
            "classes": list(self.classes),
            "boxes": self.boxes,
            "annotations": "",
            "images": "",
        }


def _dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))
    except OSError as e:
        raise DatasetError(
            f"{folder}: cannot list the folder ({e.strerror}); check the path and its permissions"
        ) from None


def _has_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image file directly."""
    try:
        return any(
            p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p.name) and p.is_file() for p in folder.iterdir()
        )
    except OSError:
        return False


def _images_below(folder: Path) -> bool:
    """Whether ``folder`` holds an image at any depth (stops at the first)."""
    for _top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES and not is_hidden(f) for f in files):
            return True
    return False


def _is_voc(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "ImageSets" / "Main").is_dir()


def _split_order(names: list[str]) -> list[str]:
    """Split names in a stable order: the known ones as listed in SPLIT_NAMES, then the others sorted."""
    order = {kind: i for i, kind in enumerate(SPLIT_NAMES)}
    return sorted(names, key=lambda n: (order.get(_kind(n), len(order)), n))


def _kind(name: str) -> str:
    """A split name as compared with the known ones: ``Train``, ``train2017`` -> ``train``."""
    return name.lower().rstrip("0123456789")


def _choose(splits: list[str], where: Path, fmt: str) -> tuple[str, str, float]:
    """(train split, val split, val share held out of train) from the split names found; with no val split,
    ``val`` names the share held out of the training split."""
    lower: dict[str, str] = {}
    for s in splits:
        lower.setdefault(_kind(s), s)
    train = next((lower[n] for n in TRAIN_NAMES if n in lower), None)
    if train is None and len(splits) == 1:
        train = splits[0]  # one split of another name (labels.csv, a single COCO file): it is the training data
    if train is None:
        raise DatasetError(
            f"{where}: {fmt} splits {', '.join(splits)} found, none named like a training split "
            f"({', '.join(TRAIN_NAMES)}); name one with --set data.train_split=NAME"
        )
    val = next((lower[n] for n in VAL_NAMES if n in lower and lower[n] != train), None)
    return (train, val, 0.0) if val else (train, HELD_OUT_VAL, VAL_SHARE)


def _voc(root: Path) -> Layout:
    splits = voc_splits(root)
    if not splits:
        raise DatasetError(f"{root}: a VOC root whose ImageSets/Main holds no split list (<split>.txt)")
    # VOC07's full devkit has train, val, trainval and test: train -> val, test left for `patchnet eval`
    train, val, share = _choose(splits, root, "VOC")
    notes = [f"split {s} not used in training" for s in splits if s not in (train, val)]
    return Layout("voc", root, splits, train, val, share, boxes=True, classes=voc_classes(root, train), notes=notes)


def _coco(root: Path) -> Layout | None:
    ann = root / "annotations"
    found = sorted(ann.glob("*.json")) if ann.is_dir() else []
    splits = [p.stem.removeprefix("instances_") for p in found if not p.stem.startswith(("captions_", "person_"))]
    roboflow = [d.name for d in _dirs(root) if (d / ROBOFLOW_FILE).is_file()]
    if splits and roboflow:
        raise DatasetError(
            f"{root}: holds both annotations/*.json and Roboflow split folders ({', '.join(roboflow)}); "
            "point patchnet at one of them"
        )
    splits = splits or roboflow
    if not splits:
        return None
    splits = _split_order(splits)
    train, val, share = _choose(splits, root, "COCO")
    return Layout("coco", root, splits, train, val, share, boxes=True)


def _csv(root: Path) -> Layout | None:
    splits = _split_order([p.stem for p in root.glob("*.csv") if not is_hidden(p.name)])
    if not splits:
        return None
    train, val, share = _choose(splits, root, "CSV")
    return Layout("csv", root, splits, train, val, share)


def _folders(root: Path, train_split: str | None, beside: bool = False) -> Layout | None:
    """An ImageFolder (``<split>/<class>/``) or a folder of class folders (``<class>/``); ``train_split`` (the
    user's) decides between them where the folder names could be either. ``beside``: another layout was found
    too (its own folders are no class folders)."""
    dirs = _dirs(root)
    if not dirs:
        return None
    named = [d for d in dirs if train_split != NO_SPLIT and (_kind(d.name) in SPLIT_NAMES or d.name == train_split)]
    others = [d for d in dirs if d not in named]
    if named and others and train_split is None and not beside:
        raise DatasetError(
            f"{root}: holds split folders ({', '.join(d.name for d in named)}) beside other folders "
            f"({', '.join(d.name for d in others[:5])}): is it split (<split>/<class>/) or one folder per class "
            "(<class>/)? Move the extra folders out, or name the split to train on with --set data.train_split=NAME "
            "(data.train_split=. reads every folder as a class)"
        )
    if named:
        classless = [d.name for d in named if not _dirs(d)]
        if classless:
            raise DatasetError(
                f"{root}: split folder(s) {', '.join(classless)} hold no class folders (expected "
                f"{root}/<split>/<class>/*.jpg); a class folder named like a split? Rename it, or pass "
                "--set data.train_split=. to read every folder of the root as a class"
            )
        splits = _split_order([d.name for d in named])
        train, val, share = _choose(splits, root, "image-folder") if train_split is None else (train_split, "", 0)
        if train_split is not None:  # the user's split, with a val split where one is named like one
            val = next((d.name for d in named if _kind(d.name) in VAL_NAMES and d.name != train_split), "")
            val, share = (val, 0.0) if val else (HELD_OUT_VAL, VAL_SHARE)
        return Layout("folder", root, splits, train, val, share)
    if not any(_images_below(d) for d in dirs):
        return None
    return Layout(
        "folder", root, [NO_SPLIT], NO_SPLIT, HELD_OUT_VAL, VAL_SHARE, notes=["no splits: one folder per class"]
    )


def detect_layout(root: str | Path, fmt: str | None = None, train_split: str | None = None) -> Layout:
    """The layout of the dataset at ``root`` (``fmt``: only that format is looked for; ``train_split``: the
    split to train on where the user named it, ``.`` for a folder of class folders)."""
    root = Path(root)
    if fmt is not None and fmt not in (*FORMATS, "demo"):
        raise DatasetError(f"format {fmt!r} is not one patchnet detects; use one of {', '.join(FORMATS)}")
    if fmt == "demo":  # the generated demo set: written into an empty folder, refused over any other
        from .demo import DEMO_CLASSES

        return Layout("demo", root, ["train", "test"], "train", "", boxes=True, classes=list(DEMO_CLASSES))
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; give the folder that holds your images (or their splits)")
    if not root.is_dir():
        raise DatasetError(
            f"{root}: is a file; give the folder that holds it (a CSV list is read as <folder>/<split>.csv, "
            "a COCO file as <folder>/annotations/instances_<split>.json)"
        )
    found: list[Layout] = []
    if fmt in (None, "voc"):
        inner = [d for d in _dirs(root) if _is_voc(d)] if not _is_voc(root) else [root]
        if len(inner) > 1:
            raise DatasetError(
                f"{root}: holds several VOC roots ({', '.join(d.name for d in inner)}); point patchnet at one, "
                f"e.g. {inner[0]}"
            )
        if inner:
            found.append(_voc(inner[0]))
    for kind, look in (("coco", _coco), ("csv", _csv)):
        if fmt in (None, kind):
            layout = look(root)
            if layout is not None:
                found.append(layout)
    # split folders of class folders beside another layout (a CSV or COCO export's split folders hold images)
    image_folder = any(_kind(d.name) in SPLIT_NAMES and _dirs(d) for d in _dirs(root))
    if fmt == "folder" or (fmt is None and (not found or image_folder)):
        layout = _folders(root, train_split, beside=bool(found) or fmt == "folder")
        if layout is not None:
            found.append(layout)
    if len(found) > 1:
        raise DatasetError(
            f"{root}: looks like {' and '.join(f.format for f in found)} data at once; choose with --format "
            f"{'|'.join(f.format for f in found)}"
        )
    if not found:
        what = f"{fmt} data" if fmt else "dataset"
        loose = " (it holds images directly: put them in one folder per class)" if _has_images(root) else ""
        raise DatasetError(
            f"{root}: found no {what}{loose}. patchnet reads a folder per class (<class>/*.jpg), split "
            "folders of them (train/<class>/, val/<class>/), a VOC devkit, COCO JSON (annotations/instances_"
            "<split>.json or a Roboflow export) or CSV lists (<split>.csv: image_path,label1;label2)"
        )
    return found[0]
