"""The two training losses: the paper's patch loss (softmax over the classes and background) and the image loss
(the pooled patch evidence of each image against its image labels)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..patches.labels import MULTI


def is_positive(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Patches that train as positives: one class, or several (MULTI)."""
    return ((labels >= 0) & (labels < num_classes)) | (labels == MULTI)


def patch_targets(
    labels: np.ndarray, index: np.ndarray, multi_rows: np.ndarray, multi_targets: np.ndarray, num_classes: int
) -> torch.Tensor:
    """(N, C + 1) target distributions of patches: one-hot, or spread evenly over a MULTI patch's classes.

    ``index``: the patches' rows in the split; ``multi_rows`` (sorted) and ``multi_targets`` (M, C): the
    classes of the split's MULTI patches.
    """
    t = np.zeros((len(labels), num_classes + 1), np.float32)
    single = labels >= 0
    t[np.flatnonzero(single), labels[single]] = 1.0
    multi = np.flatnonzero(labels == MULTI)
    if len(multi):
        m = multi_targets[np.searchsorted(multi_rows, index[multi])].astype(np.float32)
        t[multi, :num_classes] = m / m.sum(1, keepdims=True)
    return torch.from_numpy(t)


def patch_loss(logits: torch.Tensor, labels: np.ndarray, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (N, C + 1) patch logits against class indices, or against ``targets`` distributions
    (multi-label patches)."""
    if targets is not None:
        return F.cross_entropy(logits, targets.to(logits.device))
    return F.cross_entropy(logits, torch.from_numpy(labels).to(logits.device))


def image_loss(image_logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of (I, C) pooled image logits against 1/-1/0 labels; 0 (difficult only) is left out.

    ``mean`` averages over the known (image, class) pairs; ``sum`` sums over each image's classes and averages
    over images, so that its gradients match the patch loss's size and one learning rate serves both.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    known = labels != 0
    if not known.any():
        return image_logits.sum() * 0.0
    if reduction == "mean":
        return F.binary_cross_entropy_with_logits(image_logits[known], (labels[known] > 0).float())
    bce = F.binary_cross_entropy_with_logits(image_logits, (labels > 0).float(), reduction="none")
    return (bce * known).sum() / len(image_logits)


def accuracy_counts(logits: torch.Tensor, labels: np.ndarray) -> tuple[int, int]:
    """Correct arg-max predictions among the single-label patches, and their number."""
    single = labels >= 0
    return int((logits.argmax(1).cpu().numpy() == labels)[single].sum()), int(single.sum())


def sum_members(losses: Iterable[torch.Tensor]) -> torch.Tensor:
    """The head members' losses summed: each member's gradient is that of its own loss alone."""
    return torch.stack(list(losses)).sum()
