"""What single units of the frozen trunk see: first-layer filters, and the top image patches of each channel.

- The first convolution's filters as RGB images (``filters.png``).
- For one stage over a split: per channel, the images where it responds most (at most one location
  per image), each cropped to the receptive field of the unit at its peak (``units_<stage>.png``),
  in the manner of Zeiler & Fergus. Images are rescaled as in whole mode (short side at the input size).

Receptive fields come from ``patchnet.studies.receptive``, stage maps from ``patchnet.features.stages``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..backbones import Backbone
from ..data import Dataset, iter_images, load_image, open_split
from ..errors import PatchnetError
from ..features.stages import build_stage_extractor
from ..files import atomic_write, output_path
from ..recipe import Recipe
from .receptive import ReceptiveField, stage_receptive_field

log = logging.getLogger("patchnet")


# --------------------------------------------------------------------------- first-layer filters


def first_filters(backbone: Backbone) -> np.ndarray:
    """(n, k, k, 3) the first convolution's filters as RGB images, each scaled to [0, 1] on its own.

    The filters see normalised input, so they are divided by the per-channel std to show what they
    respond to in RGB; a BatchNorm right after the convolution is folded in (its scale may flip a filter).
    """
    modules = [m for _, m in backbone.trunk.named_modules()]
    i = next(i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d))
    w = modules[i].weight.detach().float().clone()
    bn = modules[i + 1] if i + 1 < len(modules) else None
    if isinstance(bn, nn.BatchNorm2d) and bn.weight is not None:
        running_var = cast(torch.Tensor, bn.running_var)  # a trunk's BatchNorm tracks its statistics
        w *= (bn.weight / torch.sqrt(running_var + bn.eps)).view(-1, 1, 1, 1)
    w /= backbone.std.float().view(1, 3, 1, 1)
    lo, hi = w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True)
    return ((w - lo) / (hi - lo).clamp(min=1e-12)).permute(0, 2, 3, 1).numpy()


def filter_grid(filters: np.ndarray, out: str | Path, cell: int = 36, gap: int = 3) -> Path:
    """A PNG grid of (n, k, k, 3) filters in [0, 1], each enlarged without smoothing."""
    n = len(filters)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * (cell + gap) + gap, rows * (cell + gap) + gap), (255, 255, 255))
    for i, f in enumerate(filters):
        tile = Image.fromarray((255 * f).round().astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(tile, (gap + (i % cols) * (cell + gap), gap + (i // cols) * (cell + gap)))
    return _save_png(sheet, out)


# --------------------------------------------------------------------------- top patches of units


def map_peaks(fmap: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel of a (C, h, w) map: its highest value and that cell's (y, x)."""
    c, h, w = fmap.shape
    values, index = fmap.reshape(c, h * w).max(1)
    flat = index.cpu().numpy()
    return values.float().cpu().numpy(), flat // w, flat % w


@dataclass
class UnitPeaks:
    """Per readable image of a split and per channel of a stage: its highest activation and where."""

    records: np.ndarray  # (N,) record index of each row
    values: np.ndarray  # (N, C)
    ys: np.ndarray  # (N, C) map cell
    xs: np.ndarray
    scale: np.ndarray  # (N, 2) network-input pixels per image pixel, (x, y)

    def top(self, channel: int, k: int = 9) -> list[int]:
        """Rows of the ``k`` images where ``channel`` peaks highest: one location per image."""
        return [int(i) for i in np.argsort(-self.values[:, channel], kind="stable")[:k]]

    def most_active(self, n: int) -> list[int]:
        """The ``n`` channels (0: all) with the highest mean over images of their peak."""
        order = np.argsort(-self.values.mean(0), kind="stable")
        return [int(c) for c in (order[:n] if n else order)]


def unit_peaks(extractor, dataset: Dataset, stage: str, progress: bool = True, workers: int = 0) -> UnitPeaks:
    """Peaks of every channel of ``stage`` in every readable image of ``dataset`` (a ``StageExtractor``)."""
    records, values, ys, xs, scale = [], [], [], [], []
    for i, image, _ in iter_images(
        dataset.records, workers=workers, device=extractor.device, desc=f"units {stage}", progress=progress
    ):
        maps, s = extractor.image_maps(image, [stage])
        v, y, x = map_peaks(maps[stage][0])
        records.append(i)
        values.append(v)
        ys.append(y)
        xs.append(x)
        scale.append(s)
    if not records:
        raise PatchnetError(f"{dataset.name}: no readable image to find unit peaks in")
    return UnitPeaks(np.array(records), np.stack(values), np.stack(ys), np.stack(xs), np.array(scale, np.float64))


def crop_square(image: np.ndarray, cx: float, cy: float, side: float, size: int = 64) -> np.ndarray:
    """A ``side``-pixel square centred on (cx, cy), grey outside the image, resized to ``size``."""
    half = side / 2
    x1, y1 = int(round(cx - half)), int(round(cy - half))
    span = max(1, int(round(side)))
    canvas = Image.new("RGB", (span, span), (128, 128, 128))
    canvas.paste(Image.fromarray(image), (-x1, -y1))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR))


def unit_crops(
    peaks: UnitPeaks, dataset: Dataset, rf: ReceptiveField, channels: list[int], k: int = 9, size: int = 64
) -> dict[int, list[np.ndarray]]:
    """Per channel, the receptive fields of its top-``k`` peaks, cropped from the original images.

    A field wider than the image's short side is cut to it (deep units see more than the image).
    """
    images: dict[int, np.ndarray] = {}
    out = {}
    for c in channels:
        crops = []
        for row in peaks.top(c, k):
            r = int(peaks.records[row])
            if r not in images:
                images[r] = load_image(dataset.records[r].path)
            img = images[r]
            sx, sy = peaks.scale[row]
            cx, cy = rf.centre(peaks.xs[row, c]) / sx, rf.centre(peaks.ys[row, c]) / sy
            side = min(rf.size / sx, min(img.shape[:2]))
            crops.append(crop_square(img, cx, cy, side, size))
        out[c] = crops
    return out


def unit_sheet(crops: dict[int, list[np.ndarray]], title: str, out: str | Path, blocks_per_row: int = 8) -> Path:
    """One PNG: a 3x3 block of crops per channel, labelled with the channel's index."""
    size = next(iter(crops.values()))[0].shape[0]
    gap, pad, label = 2, 10, 14
    block = 3 * size + 2 * gap
    n = len(crops)
    cols = min(blocks_per_row, n)
    rows = math.ceil(n / cols)
    top = 24
    sheet = Image.new("RGB", (pad + cols * (block + pad), top + rows * (block + label + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill=(0, 0, 0))
    for b, (c, tiles) in enumerate(crops.items()):
        x0 = pad + (b % cols) * (block + pad)
        y0 = top + (b // cols) * (block + label + pad)
        draw.text((x0, y0), f"channel {c}", fill=(0, 0, 0))
        for j, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile), (x0 + (j % 3) * (size + gap), y0 + label + (j // 3) * (size + gap)))
    return _save_png(sheet, out)


def _save_png(image: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda f: image.save(f, format="PNG"))


def default_stage(backbone: Backbone) -> str:
    """The middle convolutional stage: units of moderate receptive field."""
    conv = [s for s in backbone.stages if s.head == 0]
    return conv[len(conv) // 2].name


def unit_views(
    recipe: Recipe, split: str, stage: str = "", channels: int = 32, out: str | Path = "units", progress: bool = True
) -> tuple[Path, Path]:
    """Write ``filters.png`` (first-layer filters) and ``units_<stage>.png`` (top-9 patches per channel)."""
    extractor = build_stage_extractor(recipe)
    backbone = extractor.backbone
    stage = stage or default_stage(backbone)
    s = backbone.stage(stage)
    if s.head:
        conv = ", ".join(t.name for t in backbone.stages if not t.head)
        raise PatchnetError(
            f"stage {stage} of {backbone.name} is a vector without locations; choose a convolutional stage: {conv}"
        )
    out = Path(out)
    filters = filter_grid(first_filters(backbone), out / "filters.png")
    dataset = open_split(recipe.data, split)
    peaks = unit_peaks(extractor, dataset, stage, progress, recipe.runtime.workers)
    rf = stage_receptive_field(backbone, s)
    chosen = peaks.most_active(channels)
    crops = unit_crops(peaks, dataset, rf, chosen)
    title = (
        f"{backbone.name} {stage} ({s.dim} channels, stride {s.stride}, receptive field {rf.size:.0f} px): "
        f"top {len(next(iter(crops.values())))} of {len(peaks.records)} {split} images for the "
        f"{len(chosen)} most active channels"
    )
    return filters, unit_sheet(crops, title, output_path(out, f"units_{stage}", ".png"))
