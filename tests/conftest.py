"""Tiny generated datasets for the tests: nothing here needs the network or ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patchnet

# Tests compare features computed at different moments bit for bit: a thread count that changed between them
# (the governor, when other work runs beside the suite) could change the last bits of a convolution.
patchnet.threads.governor.enabled = False

CLASSES = ["cat", "dog", "person"]


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0, **save) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


def voc_xml(image_id: str, width: int, height: int, objects: list[tuple]) -> str:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult]) in VOC's 1-based pixel convention."""
    rows = [
        f"<annotation><filename>{image_id}.jpg</filename>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for obj in objects:
        name, x1, y1, x2, y2, *rest = obj
        diff = rest[0] if rest else 0
        rows.append(
            f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    rows.append("</annotation>")
    return "\n".join(rows)


class VocWriter:
    """Writes a VOC-layout folder: images, XML, split lists and (optionally) per-class lists."""

    def __init__(self, root: Path, classes=CLASSES):
        self.root, self.classes = root, classes
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def add(self, image_id: str, width: int, height: int, objects=(), mode="RGB", seed=0) -> Path:
        write_image(self.root / "JPEGImages" / f"{image_id}.jpg", width, height, mode=mode, seed=seed)
        (self.root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, width, height, list(objects)))
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def split(self, name: str, ids: list[str], labels: dict[str, list[int]] | None = None) -> None:
        main = self.root / "ImageSets" / "Main"
        (main / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        if labels is not None:
            for c in self.classes:
                (main / f"{c}_{name}.txt").write_text("".join(f"{i} {v:2d}\n" for i, v in zip(ids, labels[c])))


@pytest.fixture
def voc(tmp_path) -> VocWriter:
    return VocWriter(tmp_path / "VOC")


@pytest.fixture
def small_voc(tmp_path) -> Path:
    """Six small images with boxes in a VOC folder; split 'train' (4) and 'val' (2)."""
    w = VocWriter(tmp_path / "VOCsmall")
    specs = [
        ("a", 96, 72, [("cat", 10, 10, 60, 60)]),
        ("b", 80, 64, [("dog", 20, 5, 75, 60), ("person", 1, 1, 20, 40)]),
        ("c", 72, 96, [("person", 5, 30, 70, 95)]),
        ("d", 96, 96, [("cat", 40, 40, 96, 96, 1), ("dog", 1, 1, 40, 40)]),
        ("e", 88, 66, [("cat", 5, 5, 80, 60)]),
        ("f", 64, 80, [("dog", 3, 3, 60, 70)]),
    ]
    for n, (i, width, height, objs) in enumerate(specs):
        w.add(i, width, height, objs, seed=n)
    w.split("train", ["a", "b", "c", "d"])
    w.split("val", ["e", "f"])
    return w.root


def four_voc(root: Path, val: list[str]) -> Path:
    """Four small images, one box each, in a VOC folder: split 'train' (all four) and 'val' (``val``)."""
    w = VocWriter(root)
    for n, (i, objs) in enumerate(
        [
            ("a", [("cat", 10, 10, 60, 60)]),
            ("b", [("dog", 20, 5, 75, 60)]),
            ("c", [("person", 5, 30, 70, 70)]),
            ("d", [("cat", 40, 30, 90, 70)]),
        ]
    ):
        w.add(i, 96, 72, objs, seed=n)
    w.split("train", ["a", "b", "c", "d"])
    w.split("val", val)
    return w.root


def tiny_recipe(tmp_path: Path, root: Path, *overrides: str):
    """A recipe small enough to train in seconds on the CPU: Lite0 at 32 px, two scales, a small head."""
    from patchnet.recipe import recipe_from_dict

    base = [
        "name=tiny",
        f"runtime.output={tmp_path / 'runs'}",
        "data.format=voc",
        f"data.root={root}",
        "data.classes=[cat, dog, person]",
        "data.train_split=train",
        "data.val_split=val",
        "patches.scales=[1.0, 2.0]",
        "patches.step=0.5",
        "backbone.input_size=32",
        "backbone.precision=fp32",
        "train.precision=fp32",
        "runtime.device=cpu",
        f"runtime.cache_dir={tmp_path / 'cache'}",
        "cache.chunk=2",
        "train.epochs=2",
        "train.batch_size=8",
        "runtime.workers=0",
        "train.bg_rate=0.5",
        "head.hidden=32",
        "train.eval_every=1",
    ]
    return recipe_from_dict({}, base + list(overrides))


def build(recipe, dataset, extractor, **kw):
    """The recipe's feature cache of a split, its cache spec made with the same extractor."""
    from patchnet.features.build import build_features, cache_spec

    return build_features(cache_spec(recipe, extractor, progress=False), dataset, extractor, **kw)


def calibrated_model(tmp: Path):
    """A tiny calibrated model (half the training images held out to fit the calibration) of four_voc, and its
    VOC root."""
    import patchnet
    from patchnet.training.trainer import train

    root = four_voc(tmp / "VOC", ["a", "b"])
    recipe = tiny_recipe(tmp, root, "train.epochs=2", "train.holdout=0.5")
    train(recipe, progress=False)
    return patchnet.load(recipe.run_dir / "last.pt", device="cpu"), root
