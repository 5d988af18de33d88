"""Figures: patches coloured by training label (the paper's Figure 4)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import patheffects
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from .datasets import ImageRecord, load_image
from .figures import new_figure, plain, save_figure
from .sampler import IGNORE, grid_by_scale, label_patches

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
    """An image with the boxes of each class (``patchnet.localize.Detection``: class index, box, score): the first
    box of a class solid, its next ones dashed, each labelled with the class and its score."""
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
