"""Candidate regions for the detection head (``train.detector: mil``): the paper's square patches and rectangles of
other aspect ratios over the same scales and steps, each pooled from the pyramid level nearest its size.

A region of scale ``s`` and aspect ratio ``r`` (width over height) has the area of the square of side
``min(w, h) / s`` (``patchnet.patches.grid``), so ``r = 1`` gives exactly the paper's squares; a side that
would pass the image is cut to it. Positions follow the square grid's rule on each axis (stride
``step`` times the region's side on that axis, the last region snapped to the border).
"""

from __future__ import annotations

import math

import numpy as np

from .grid import _axis_positions

DEFAULT_RATIOS = (1.0, 0.5, 2.0, 1 / 3, 3.0)  # width : height


def region_boxes(width: int, height: int, scales, step: float, ratios=DEFAULT_RATIOS) -> np.ndarray:
    """(R, 4) float32 ``x1, y1, x2, y2`` in pixels: every region of every scale and aspect ratio, without
    duplicates (a ratio whose rectangle the image cuts back to one already made adds nothing)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < step <= 0.5:
        raise ValueError(f"step must lie in (0, 0.5], got {step}")
    out = []
    for scale in scales:
        side = min(width, height) / scale
        for ratio in ratios:
            if ratio <= 0:
                raise ValueError(f"aspect ratios must be positive, got {ratio}")
            rw, rh = min(side * math.sqrt(ratio), width), min(side / math.sqrt(ratio), height)
            xs = _axis_positions(width, rw, step * rw)
            ys = _axis_positions(height, rh, step * rh)
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            out.append(np.stack([xx.ravel(), yy.ravel(), xx.ravel() + rw, yy.ravel() + rh], axis=1))
    boxes = np.concatenate(out).astype(np.float32)
    _, first = np.unique(np.round(boxes, 2), axis=0, return_index=True)
    return boxes[np.sort(first)]


def region_levels(boxes: np.ndarray, factors, input_size: int) -> np.ndarray:
    """(R,) the pyramid level each region is pooled from: of the levels that rescale the image by ``factors`` (L,),
    the one where the square of the region's area comes nearest in log-scale to the trunk's ``input_size``
    (shared mode's rule for the squares, ``patch_plan``, here measured on the rescaled image)."""
    boxes = np.asarray(boxes, np.float64)
    side = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6))
    scaled = np.log(side[:, None] * np.asarray(factors, np.float64)[None] / input_size)
    return np.abs(scaled).argmin(1)
