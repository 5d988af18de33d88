"""Where each class was found: per-pixel patch-score maps, heatmap figures and top-scoring patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..data import DatasetError
from ..evaluation.maps import score_map
from ..head.pooling import item_groups, map_values, pool_image
from .figures import new_figure, plain, save_figure


def class_index(classes: list[str], names: list[str]) -> list[int]:
    """Indices of class names, with an error that lists the valid names."""
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DatasetError(f"unknown class name(s) {', '.join(unknown)}; valid names: {', '.join(classes)}")
    return [classes.index(n) for n in names]


def heatmap_figure(
    image: np.ndarray, maps: list[np.ndarray], titles: list[str], cols: int = 3, alpha: float = 0.5
) -> Figure:
    """The image under a translucent colour map of each score map, side by side, each with a colour bar."""
    n = len(maps)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    h, w = image.shape[:2]
    panel = 4.0
    fig, axes = new_figure(rows, cols, figsize=(panel * cols * 1.12, panel * rows * h / w + 0.5 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    vmax = max(1e-6, max(float(m.max()) for m in maps))
    for ax, m, title in zip(axes.ravel(), maps, titles):
        ax.imshow(image)
        overlay = ax.imshow(m, cmap="jet", alpha=alpha, vmin=0.0, vmax=vmax, interpolation="bilinear")
        ax.set_title(plain(title), fontsize=9)
        fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def class_maps(
    boxes: np.ndarray,
    values: np.ndarray,
    width: int,
    height: int,
    classes: list[int],
    reduce: str = "mean",
    prior: float = 0.0,
) -> list[np.ndarray]:
    """Per-pixel maps of the patch values of each class index, averaged (or maxed) over covering patches."""
    return [score_map(boxes, values[:, c], width, height, reduce, prior) for c in classes]


def render_heatmaps(
    image: np.ndarray,
    boxes: np.ndarray,
    values: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    chosen: list[int],
    out: str | Path,
    reduce: str = "mean",
    cols: int = 3,
    probabilities: np.ndarray | None = None,
    prior: float = 0.0,
) -> Path:
    """Write one PNG with a heatmap per chosen class; titles give the class, its image score (and probability)."""
    h, w = image.shape[:2]
    maps = class_maps(boxes, values, w, h, chosen, reduce, prior)
    probs = None if probabilities is None else [float(probabilities[c]) for c in chosen]
    return write_heatmaps(
        image, maps, [class_names[c] for c in chosen], [float(scores[c]) for c in chosen], out, probs, cols
    )


def write_heatmaps(
    image: np.ndarray,
    maps: list[np.ndarray],
    names: list[str],
    scores: list[float],
    out: str | Path,
    probabilities: list[float] | None = None,
    cols: int = 3,
) -> Path:
    """Write one PNG of score maps over their image (``heatmap_figure``), each titled with its class, its image
    score and probability: what ``render_heatmaps`` and ``patchnet predict --out`` draw."""
    titles = [
        f"{name}: score {score:.3g}" + (f", P {probabilities[i]:.2f}" if probabilities is not None else "")
        for i, (name, score) in enumerate(zip(names, scores))
    ]
    return save_figure(heatmap_figure(image, maps, titles, cols), out)


def top_classes(scores: np.ndarray, top: int) -> list[int]:
    return [int(c) for c in np.argsort(-np.asarray(scores))[:top]]


def log_heatmaps(writer, head, split, recipe, epoch: int, items: np.ndarray) -> None:
    """Draw the top two classes of the first few selection images into TensorBoard, their maps with the recipe's
    ``infer.map_prior`` as everywhere else."""
    from ..data import DatasetError, load_image

    store, dataset, name = split.store, split.dataset, recipe.infer_pool
    shown = 0
    for i in items:
        if shown >= recipe.runtime.heatmaps:
            break
        try:
            image = load_image(dataset.records[store.record[i]].path)
        except DatasetError:
            continue
        s = store.item_slice(i)
        logits = head.logits(store.rows[s])
        values = map_values(logits, name).numpy()
        scores = pool_image(logits, recipe.pool, name)
        chosen = top_classes(scores, 2)
        h, w = image.shape[:2]
        fig = heatmap_figure(
            image,
            class_maps(store.patch_boxes[s], values, w, h, chosen, prior=recipe.infer.map_prior),
            [f"{dataset.classes[c]}: {scores[c]:.3g}" for c in chosen],
            cols=2,
        )
        writer.add_figure(f"heatmaps/{dataset.records[store.record[i]].image_id}", fig, epoch)
        shown += 1


def best_patch_per_item(
    features, offsets: np.ndarray, head, num_classes: int, pool_name: str = "power", batch_size: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """For every item and class, the highest map value over its patches and that patch's index (-1 if none)."""
    n = len(offsets) - 1
    scores = np.full((n, num_classes), -1.0, np.float32)
    patches = np.full((n, num_classes), -1, np.int64)
    for start, stop in item_groups(np.diff(offsets), batch_size):
        base = int(offsets[start])
        values = map_values(head.logits(features[base : int(offsets[stop])]), pool_name).numpy()
        for i in range(start, stop):
            a, b = int(offsets[i]) - base, int(offsets[i + 1]) - base
            if b > a:
                j = values[a:b].argmax(0)
                patches[i] = j
                scores[i] = values[a:b][j, np.arange(num_classes)]
    return scores, patches


def top_items(scores: np.ndarray, usable: np.ndarray, c: int, n: int = 9) -> list[int]:
    """The ``n`` items whose best patch scores highest for class ``c``."""
    usable = usable & (scores[:, c] >= 0)  # items without patches have no best patch
    order = np.argsort(-np.where(usable, scores[:, c], -np.inf), kind="stable")
    return [int(i) for i in order[:n] if usable[i]]


def contact_sheet(crops: list[np.ndarray], captions: list[str], title: str, out: str | Path, cols: int = 3) -> Path:
    """A grid of patch crops with a caption under each."""
    rows = max(1, (len(crops) + cols - 1) // cols)
    fig, axes = new_figure(rows, cols, figsize=(2.6 * cols, 2.9 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, crop, cap in zip(axes.ravel(), crops, captions):
        ax.imshow(crop)
        ax.set_title(plain(cap), fontsize=8, y=-0.14)
    fig.suptitle(plain(title), fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out)
