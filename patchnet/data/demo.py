"""A small generated dataset in VOC layout: textured shapes on cluttered backgrounds.

Colours and fill textures are drawn independently of the class, so only the outline tells the
classes apart; objects vary in size, rotation and count, and may overlap.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import PatchnetError
from ..files import atomic_write, file_lock

DEMO_CLASSES = ["disc", "ring", "square", "triangle", "star", "cross"]
DEMO_SPLITS = {"train": 240, "test": 120}
_VERSION = "1"  # bump when the generator changes, so that old folders are rebuilt


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "star":
        pts = [
            ((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
            for i, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)
        ]
    elif kind == "cross":
        t = 0.33
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random fill: solid, stripes, checks or smooth noise, in random colours."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        t = np.zeros((h, w))
    elif kind == 1:
        a, period = rng.uniform(0, math.pi), rng.uniform(4, 14)
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0).astype(float)
    elif kind == 2:
        p = int(rng.integers(4, 12))
        t = ((xx // p + yy // p) % 2).astype(float)
    else:
        small = rng.random((max(h // 8, 2), max(w // 8, 2)))
        t = (
            np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))
            / 255.0
        )
    rgb = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return Image.fromarray(rgb.astype(np.uint8))


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth colour field with clutter: lines, arcs and blurred blobs that belong to no class."""
    img = _texture(rng, w, h).filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.normal(0, w / 3), y0 + rng.normal(0, h / 3)
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=color, width=int(rng.integers(1, 5)))
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            draw.arc(box, rng.uniform(0, 360), rng.uniform(0, 360), fill=color, width=int(rng.integers(1, 4)))
    return img


def _draw_object(img: Image.Image, rng: np.random.Generator, kind: str, cx: float, cy: float, r: float) -> tuple:
    w, h = img.size
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if kind in ("disc", "ring"):
        rx, ry = r, r * rng.uniform(0.85, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        if kind == "ring":
            f = rng.uniform(0.45, 0.65)
            draw.ellipse([cx - f * rx, cy - f * ry, cx + f * rx, cy + f * ry], fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    img.paste(_texture(rng, w, h), (0, 0), mask)
    ys, xs = np.nonzero(np.asarray(mask))
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _write_xml(path: Path, image_id: str, w: int, h: int, objects: list[tuple[str, tuple, int]]) -> None:
    rows = [
        f"<annotation><folder>demo</folder><filename>{image_id}.jpg</filename>",
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
    ]
    for name, (x1, y1, x2, y2), difficult in objects:
        # VOC stores 1-based inclusive pixel indices
        rows.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
            f"<xmin>{int(x1) + 1}</xmin><ymin>{int(y1) + 1}</ymin><xmax>{int(x2)}</xmax><ymax>{int(y2)}</ymax>"
            "</bndbox></object>"
        )
    rows.append("</annotation>")
    path.write_text("\n".join(rows))


def make_image(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, tuple, int]]]:
    """One demo image and its objects ``(class, box, difficult)``."""
    w, h = int(rng.integers(240, 321)), int(rng.integers(180, 241))
    img = _background(rng, w, h)
    objects = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.choice([1, 1, 2, 2, 3]))):
        for _attempt in range(20):
            r = rng.uniform(0.08, 0.32) * min(w, h)
            cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
            # allow some overlap, but never hide most of an earlier object
            if all(math.hypot(cx - px, cy - py) > 0.8 * (r + pr) for px, py, pr in placed):
                break
        else:
            continue
        kind = DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
        box = _draw_object(img, rng, kind, cx, cy, r)
        placed.append((cx, cy, r))
        difficult = int(r < 0.1 * min(w, h))  # tiny objects are marked difficult, as in VOC
        objects.append((kind, box, difficult))
    return img, objects


class DemoFolderError(PatchnetError, ValueError):
    """A folder the demo generator will not write into."""


STAMP = ".patchnet-demo"  # the generator's mark: it writes only into an empty folder or one that holds this


def make_demo(root: str | Path, seed: int = 0, splits: dict[str, int] | None = None) -> Path:
    """Write the demo dataset under ``root`` in VOC layout (deterministic for a seed); returns root.

    Only into an empty (or missing) folder, or one this generator made: any other folder is refused
    before anything is written to it, so that ``data.format: demo`` pointed at a real dataset never
    overwrites it. The stamp is written first (as incomplete) and completed last, so an interrupted
    generation is redone; processes generating at once (torchrun ranks) take turns under a lock.
    """
    root = Path(root)
    splits = splits or DEMO_SPLITS
    signature = f"{_VERSION} {seed} {sorted(splits.items())}"
    if _stamp(root) == signature:
        return root
    _check_ours(root)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / LOCK, f"the demo set in {root}"):
        if _stamp(root) == signature:  # another process made it while this one waited
            return root
        _check_ours(root)
        atomic_write(root / STAMP, f"incomplete {signature}")
        _generate(root, seed, splits)
        atomic_write(root / STAMP, signature)
    return root


LOCK = ".patchnet-demo.lock"


def _stamp(root: Path) -> str | None:
    try:
        return (root / STAMP).read_text()
    except OSError:
        return None


def _check_ours(root: Path) -> None:
    """Refuse a folder that holds anything but the generator's own files."""
    if _stamp(root) is not None or not root.exists():
        return
    if not root.is_dir() or any(STAMP not in p.name for p in root.iterdir()):  # its lock and stamp files aside
        raise DemoFolderError(
            f"{root}: data.format is demo, but this folder is not empty and was not made by the "
            f"demo generator (no {STAMP} file), so nothing was written to it. To read the dataset "
            "there, give its format (--format voc, coco, folder or csv, or data.format in the "
            "recipe); to generate the demo set, choose an empty or new folder (--data data/demo)"
        )


def _generate(root: Path, seed: int, splits: dict[str, int]) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in splits.items():
        ids = []
        labels: dict[str, list[int]] = {c: [] for c in DEMO_CLASSES}
        for _ in range(count):
            image_id = f"{n:06d}"
            n += 1
            img, objects = make_image(rng)
            img.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            _write_xml(root / "Annotations" / f"{image_id}.xml", image_id, img.width, img.height, objects)
            ids.append(image_id)
            for c in DEMO_CLASSES:
                flags = [d for name, _, d in objects if name == c]
                labels[c].append(-1 if not flags else (1 if 0 in flags else 0))
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for c in DEMO_CLASSES:
            rows = [f"{i} {v:2d}" for i, v in zip(ids, labels[c])]
            (root / "ImageSets/Main" / f"{c}_{split}.txt").write_text("\n".join(rows) + "\n")
