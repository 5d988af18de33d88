"""Patch scores -> image scores: the paper's power-k mean, max, log-sum-exp and WILDCAT's top/bottom-k.

Every pooling reduces the patches of each image in one vectorised call: the patches of a batch of
images are padded to the largest image's count, so there is no Python loop over images. Training
(the image loss), ``eval``, ``predict`` and the heatmaps all go through :func:`pool`.

What is pooled:
- ``power``: the softmax outputs ``y(c|P)``, as in the paper: ``(1/M) sum_i y(c|P_i)^k``.
- ``max``, ``lse``, ``topk``: a patch's *evidence* for class c, its logit against background,
  ``log y(c|P) - log y(bg|P)``; the pooled value is an image logit, ready for a sigmoid.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..recipe import POOLINGS, PoolConfig

__all__ = [
    "POOLINGS",
    "gather_items",
    "item_groups",
    "l2_normalize",
    "map_values",
    "patch_values",
    "pool",
    "pool_features",
    "pool_image",
    "pool_items",
    "pooled_share",
]


def patch_values(logits: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C + 1) head logits -> (N, C) values that the pooling ``name`` reduces."""
    if name == "power":
        return logits.float().softmax(-1)[:, :-1]
    return logits[:, :-1] - logits[:, -1:]


def map_values(logits: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C) per-patch values for score maps, in [0, 1]: y(c|P) for ``power``, else sigmoid of the evidence."""
    values = patch_values(logits, name)
    return values if name == "power" else values.float().sigmoid()


def _padded(values: torch.Tensor, counts: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C) values of consecutive items -> (I, M, C) padded with ``fill``, and the (I, M) validity mask."""
    n, m = len(counts), int(counts.max()) if len(counts) else 0
    valid = torch.arange(m, device=values.device)[None, :] < counts[:, None]
    out = values.new_full((n, m, values.shape[1]), fill)
    out[valid] = values
    return out, valid


def pool(values: torch.Tensor, counts, cfg: PoolConfig, name: str | None = None) -> torch.Tensor:
    """Pool (P, C) patch values of consecutive items with ``counts`` patches each into (I, C) image scores.

    ``name`` overrides ``cfg.name``; the other parameters come from ``cfg``. Differentiable.
    """
    name = name or cfg.name
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.long, device=values.device)
    if len(counts) and int(counts.min()) < 1:
        raise ValueError("every item needs at least one patch to be pooled")
    if int(counts.sum()) != len(values):
        raise ValueError(f"counts add up to {int(counts.sum())} patches, but {len(values)} values were given")
    n = counts.to(values.dtype)[:, None]
    if name == "power":
        padded, _ = _padded(values.pow(cfg.k), counts, 0.0)
        return padded.sum(1) / n
    if name == "max":
        return _padded(values, counts, -torch.inf)[0].amax(1)
    if name == "lse":
        # (1/r) log((1/M) sum exp(r e)): between the mean (r -> 0) and the max (r -> inf)
        padded, _ = _padded(values * cfg.r, counts, -torch.inf)
        return (torch.logsumexp(padded, 1) - n.log()) / cfg.r
    if name == "topk":
        padded, valid = _padded(values, counts, -torch.inf)
        ordered = padded.sort(1, descending=True).values  # padding sorts last
        rank = torch.arange(padded.shape[1], device=values.device)[None, :]
        top = (cfg.top * counts).round().clamp(min=1)[:, None]
        out = _masked_mean(ordered, rank < top)
        if cfg.alpha and cfg.bottom > 0:
            bottom = (cfg.bottom * counts).round().clamp(min=1)[:, None]
            # the lowest patches: ranks counted back from each item's own last valid patch
            low = (rank >= counts[:, None] - bottom) & valid
            out = out + cfg.alpha * _masked_mean(ordered, low)
        return out
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {name!r}")


def pool_image(logits: torch.Tensor, cfg: PoolConfig, name: str | None = None) -> np.ndarray:
    """(C,) score of one image from its (N, C + 1) patch logits."""
    name = name or cfg.name
    return pool(patch_values(logits, name).double(), [len(logits)], cfg, name)[0].numpy()


def _masked_mean(ordered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(ordered.dtype)[:, :, None]
    return torch.where(w > 0, ordered, 0.0).sum(1) / w.sum(1)


def item_groups(counts: np.ndarray, max_patches: int = 32768) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``[start, stop)`` of items with ``counts`` patches, each of at most about ``max_patches``
    patches (and at least one item)."""
    ends = np.cumsum(counts)
    n, start = len(counts), 0
    while start < n:
        base = ends[start - 1] if start else 0
        stop = min(n, max(int(np.searchsorted(ends, base + max_patches, side="right")), start + 1))
        yield start, stop
        start = stop


def pooled_share(draw: np.ndarray, counts: np.ndarray, share: float) -> np.ndarray:
    """The mask of the rows (whole images, ``counts`` rows each) whose uniform ``draw`` falls under ``share``, plus
    each image's lowest draw: a random share of every image's patches, never none of them."""
    image = np.repeat(np.arange(len(counts)), counts)
    lowest = np.full(len(counts), np.inf)
    np.minimum.at(lowest, image, draw)
    return (draw < share) | (draw == lowest[image])


def gather_items(features, offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
    """float32 rows of the patches of ``items`` (in that order) from a (memory-mapped) feature array."""
    parts = [features[int(offsets[i]) : int(offsets[i + 1])] for i in items]
    if not parts:
        return np.zeros((0, features.shape[1]), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


@torch.no_grad()
def pool_items(
    head,
    features,
    offsets: np.ndarray,
    cfg: PoolConfig,
    name: str | None = None,
    items: np.ndarray | None = None,
    max_patches: int = 32768,
) -> np.ndarray:
    """(I, C) image scores of ``items`` (default: all) of a feature array, e.g. a memory-mapped store.

    Items are streamed in groups of about ``max_patches`` patches; items without patches score NaN.
    """
    name = name or cfg.name
    items = np.arange(len(offsets) - 1) if items is None else np.asarray(items, np.int64)
    counts = np.diff(offsets)[items]
    out = np.full((len(items), head.num_classes), np.nan)
    for start, stop in item_groups(counts, max_patches):
        keep = np.flatnonzero(counts[start:stop] > 0) + start
        if not len(keep):
            continue
        logits = head.logits(gather_items(features, offsets, items[keep]))
        out[keep] = pool(patch_values(logits, name).double(), counts[keep], cfg, name).cpu().numpy()
    return out


def pool_features(
    features, offsets: np.ndarray, items: np.ndarray, name: str = "max", max_patches: int = 32768
) -> np.ndarray:
    """(len(items), d) float32 mean- or max-pooled raw patch features of items with at least one patch."""
    if name not in ("mean", "max"):
        raise ValueError(f"features are pooled by mean or max, got {name!r}")
    items = np.asarray(items, np.int64)
    counts = np.diff(offsets)[items]
    out = np.zeros((len(items), features.shape[1]), np.float32)
    for start, stop in item_groups(counts, max_patches):
        x = torch.from_numpy(gather_items(features, offsets, items[start:stop]))
        c = torch.from_numpy(counts[start:stop])
        out[start:stop] = (
            _padded(x, c, -torch.inf)[0].amax(1) if name == "max" else _padded(x, c, 0.0)[0].sum(1) / c[:, None]
        ).numpy()
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
