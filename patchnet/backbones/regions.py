"""Pooling a patch's region of a feature map: exact means over boxes in map-cell units, fractional cells weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_mean(fmap: torch.Tensor, cells: torch.Tensor, row_sums: bool = False) -> torch.Tensor:
    """Mean of a (1, C, h, w) map over boxes (N, 4) in cell units, each cell weighted by its overlap.

    The integral of a map that is constant on each cell is bilinear inside each cell, so bilinear
    interpolation of the summed-area table gives it exactly at fractional coordinates. A box that
    covers whole cells gets their plain mean, as in exact mode. The four corners' interpolations are
    16 weighted rows of the table per box: one ``embedding_bag`` sums them without temporaries.

    ``row_sums``: build the table by adding rows and columns one after another, about 10x faster than
    ``cumsum`` over its outer dimensions on a CPU, equal to its last bit or two (the detection head
    pools 2048 channels of thousands of regions this way; patch features keep ``cumsum``'s bits).
    """
    _, c, h, w = fmap.shape
    sat = fmap.new_zeros((h + 1, w + 1, c), dtype=torch.float32)
    sat[1:, 1:] = fmap[0].permute(1, 2, 0)
    if row_sums:
        for i in range(2, h + 1):
            sat[i] += sat[i - 1]
        for j in range(2, w + 1):
            sat[:, j] += sat[:, j - 1]
        sat = sat.reshape(-1, c)
    else:
        sat = sat.cumsum_(0).cumsum_(1).reshape(-1, c)
    x1, y1, x2, y2 = cells.float().unbind(1)
    xs = torch.stack([x2.clamp(0, w), x1.clamp(0, w)], 1)  # (N, 2): corners with sign +, -
    ys = torch.stack([y2.clamp(0, h), y1.clamp(0, h)], 1)
    area = ((xs[:, 0] - xs[:, 1]) * (ys[:, 0] - ys[:, 1])).clamp(min=1e-6)
    sign = torch.tensor([1.0, -1.0], device=cells.device)[None, :, None]

    def taps(v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 4) rows and signed weights
        v0 = v.floor().clamp(max=n - 1)
        frac = (v - v0)[..., None]
        return torch.stack([v0, v0 + 1], 2).long().flatten(1), (torch.cat([1 - frac, frac], 2) * sign).flatten(1)

    (iy, wy), (ix, wx) = taps(ys, h), taps(xs, w)
    index = (iy[:, :, None] * (w + 1) + ix[:, None, :]).flatten(1)  # (N, 16)
    weight = (wy[:, :, None] * wx[:, None, :]).flatten(1) / area[:, None]
    return F.embedding_bag(index, sat, per_sample_weights=weight, mode="sum")


def region_weights(cells: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h * w) weights whose product with an (h * w, C) map gives ``region_mean`` of boxes ``cells``.

    A box's weight on a cell is the cell's area inside the box over the box's area (both clipped to
    the map). Far faster than the summed-area table to differentiate on the small maps of the last
    stages (``train.unlock``); but it grows with the map, so inference keeps ``region_mean``.
    """
    x1, y1, x2, y2 = cells.float().unbind(1)
    x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
    y1, y2 = y1.clamp(0, h), y2.clamp(0, h)

    def overlap(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:  # (N, n): each cell's length inside
        j = torch.arange(n, device=cells.device, dtype=torch.float32)
        return (torch.minimum(hi[:, None], j + 1) - torch.maximum(lo[:, None], j)).clamp(min=0)

    area = ((x2 - x1) * (y2 - y1)).clamp(min=1e-6)[:, None, None]
    return (overlap(y1, y2, h)[:, :, None] * overlap(x1, x2, w)[:, None, :] / area).reshape(len(cells), h * w)
