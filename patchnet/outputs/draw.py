"""Figures: patches coloured by training label (the paper's Figure 4), boxes, and images labelled with their classes."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ..data import ImageRecord, load_image
from ..patches.grid import grid_by_scale
from ..patches.labels import IGNORE, label_patches
from .figures import new_figure, plain, save_figure

OUTLINE = [patheffects.withStroke(linewidth=3, foreground="black")]


def class_colors(n: int) -> list:
    """Distinct saturated colours (no greys, which would read as background): golden-ratio hues."""
    from matplotlib.colors import hsv_to_rgb

    return [(*hsv_to_rgb(((0.08 + i * 0.618034) % 1.0, 0.9, 1.0)), 1.0) for i in range(n)]


def draw_labels(record: ImageRecord, classes: list[str], patches_cfg, out: str | Path) -> Path:
    """One panel per scale: positives in their class colour, background grey, ignored red dashed."""
    image = load_image(record.path)
    grids = grid_by_scale(record.width, record.height, patches_cfg.scales, patches_cfg.step)
    colors = class_colors(len(classes))
    cols = min(3, len(grids))
    rows = math.ceil(len(grids) / cols)
    aspect = record.height / record.width
    fig, axes = new_figure(rows, cols, figsize=(4.5 * cols, (4.5 * aspect + 0.4) * rows + 0.9))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, g in zip(axes.ravel(), grids):
        _draw_scale(ax, image, g, record, classes, colors)
    present = sorted(set(record.box_classes.tolist()))
    handles = [Line2D([], [], color=colors[c], lw=2, label=plain(classes[c])) for c in present]
    handles += [
        Line2D([], [], color="lightgrey", marker="o", ls="", markeredgecolor="k", label="background (centre)"),
        Line2D([], [], color="red", lw=1, ls="--", label="ignored"),
        Line2D([], [], color="white", lw=1.5, label="object box"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, facecolor="0.7")
    fig.suptitle(plain(f"{record.image_id}: training labels of patches"), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_figure(fig, out, dpi=110)


def _draw_scale(ax, image, grid, record: ImageRecord, classes: list[str], colors: list) -> None:
    """One scale's panel: its patches by training label over the image, and the object boxes."""
    labels = label_patches(
        grid.boxes, record.boxes, record.box_classes, record.box_difficult, len(classes), image_labels=record.labels
    )
    ax.imshow(image)
    centers = (grid.boxes[:, :2] + grid.boxes[:, 2:]) / 2
    bg = labels == len(classes)
    ax.scatter(centers[bg, 0], centers[bg, 1], s=6, c="lightgrey", edgecolors="black", linewidths=0.3)
    for (x1, y1, x2, y2), lab in zip(grid.boxes, labels):
        if lab == IGNORE:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=1.0, ls="--"))
        elif lab != len(classes):
            face = (*colors[lab][:3], 0.12)
            ax.add_patch(
                Rectangle(
                    (x1, y1), x2 - x1, y2 - y1, facecolor=face, edgecolor=colors[lab], lw=2.0, path_effects=OUTLINE
                )
            )
    for box, c, d in zip(record.boxes, record.box_classes, record.box_difficult):
        name = classes[c] + (" (difficult)" if d else "")
        _labelled_box(ax, box, name, "white", lw=1.5, ls=":" if d else "-", fontsize=6)
    pos = int(((labels >= 0) & (labels < len(classes))).sum())
    ign, nbg = int((labels == IGNORE).sum()), int(bg.sum())
    ax.set_title(f"λ={grid.scale:g} (side {grid.side:.0f} px): {pos} pos, {nbg} bg, {ign} ignored", fontsize=8)


def draw_detections(image, detections: list, classes: list[str], out: str | Path, max_boxes: int = 3) -> Path:
    """An image with the boxes of each class (``patchnet.evaluation.localize.Detection``: class index, box,
    score): the first box of a class solid, its next ones dashed, each labelled with the class and its score."""
    h, w = image.shape[:2]
    fig, axes = new_figure(figsize=(6.0, 6.0 * h / w + 0.2))
    ax = axes[0, 0]
    ax.imshow(image)
    ax.axis("off")
    colors, seen = class_colors(len(classes)), dict[int, int]()
    for d in detections:
        rank = seen[d.class_index] = seen.get(d.class_index, -1) + 1
        if rank >= max_boxes:
            continue
        label = f"{classes[d.class_index]} {d.score:.2f}"
        first = rank == 0
        _labelled_box(ax, d.box, label, colors[d.class_index], lw=2.5 if first else 1.2, ls="-" if first else "--")
    fig.tight_layout(pad=0.1)
    return save_figure(fig, out)


def _labelled_box(ax, box, label: str, color, lw: float, ls: str, fontsize: int = 8) -> None:
    """An outlined box with its label inside its top-left corner."""
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=lw, ls=ls, path_effects=OUTLINE))
    ax.text(x1 + 3, y1 + 3, plain(label), fontsize=fontsize, va="top", color=color, path_effects=OUTLINE)


PRESENT_COLOR, ABSENT_COLOR = (255, 214, 0), (215, 215, 215)  # yellow reads on any photo behind the dark box


@lru_cache(maxsize=16)
def _font(size: int, bold: bool):
    """Matplotlib's DejaVu Sans, which every install carries: no system font needed, and it has the tick."""
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def label_image(image: np.ndarray, rows: list[tuple[str, str, bool]], min_side: int = 360):
    """A PIL copy of an RGB image with a label box in its top-left corner: one line per ``(class, value,
    present)``, a class judged present in bold yellow after a tick, the others in grey. An image whose shorter
    side is under ``min_side`` pixels is enlarged first, so that the label stays legible without hiding it."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    short = min(im.size)
    if short < min_side:
        scale = min_side / short
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    size = max(12, round(min(im.size) / 24))
    pad, gap, margin = size // 2, size // 4, size // 4
    fonts = [_font(size, present) for _, _, present in rows]
    tick = "\u2713 "
    indent = max(f.getlength(tick) for f in fonts) if rows else 0
    name_w = max((f.getlength(name) for f, (name, _, _) in zip(fonts, rows)), default=0)
    value_w = max((f.getlength(value) for f, (_, value, _) in zip(fonts, rows)), default=0)
    line_h = size + gap
    width = round(pad * 2 + indent + name_w + size + value_w)
    height = pad * 2 + line_h * len(rows) - gap
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rounded_rectangle((margin, margin, margin + width, margin + height), radius=pad, fill=(0, 0, 0, 170))
    for i, (font, (name, value, present)) in enumerate(zip(fonts, rows)):
        x, y, color = margin + pad, margin + pad + i * line_h, PRESENT_COLOR if present else ABSENT_COLOR
        if present:
            draw.text((x, y), tick, font=font, fill=color)
        draw.text((x + indent, y), name, font=font, fill=color)
        draw.text((margin + width - pad, y), value, font=font, fill=color, anchor="ra")  # values right-aligned
    return Image.alpha_composite(im.convert("RGBA"), overlay).convert("RGB")


def draw_confusion(matrix: np.ndarray, classes: list[str], out: str | Path, title: str = "") -> Path:
    """A confusion matrix of single-label images (rows: the true class, columns: the predicted one), each row
    shaded by its share and every cell labelled with its count."""
    matrix = np.asarray(matrix)
    n = len(classes)
    side = min(max(3.5, 0.45 * n + 2.0), 16.0)
    fig, axes = new_figure(figsize=(side + 0.8, side))
    ax = axes[0, 0]
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # beyond that the counts would not be legible
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color, fontsize=8)
    names = [plain(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=90 if n > 4 else 0, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(plain(title), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)
