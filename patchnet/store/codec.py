"""How patch features are stored in the cache: fp16, per-row 8-bit codes, or a PCA projection of either.

- ``none``: the trunk's features in fp16 (2 bytes per value).
- ``int8``: each row as 8-bit codes of an affine map ``x = code * step + low`` with the row's own
  ``step`` and ``low`` (float32): the rows are non-negative (ReLU6) or, after PCA, signed and
  uneven, so an affine map uses all 256 levels where a symmetric one would waste half of them.
  The error of a value is at most half a step, ``(max - min) / 510`` of its row.
- ``pca``: the projection on the ``cache.pca_dim`` leading principal components of the training
  split's patches, in fp16. The head then reads ``pca_dim`` values per patch instead of the trunk's d.
- ``pca_int8``: that projection as 8-bit codes.

A codec's input is always the fp16 feature, so a cache encoded from an fp16 cache and one encoded
straight from the extractor hold the same rows; ``roundtrip`` gives the features exactly as the
head reads them from the cache, for images scored without it (``patchnet predict``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from ..errors import PatchnetError

QUANT_LEVELS = 255


class CodecError(PatchnetError, ValueError):
    """A feature codec that cannot be used as asked."""


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) float -> (N, d) uint8 codes and (N, 2) float32 ``[step, low]`` per row (affine, 256 levels)."""
    x = np.asarray(x, np.float32)
    if not len(x):
        return np.zeros(x.shape, np.uint8), np.zeros((0, 2), np.float32)
    low, high = x.min(1), x.max(1)
    step = (high - low) / QUANT_LEVELS
    step[step == 0] = 1.0  # a constant row: every code is 0
    codes = np.rint((x - low[:, None]) / step[:, None]).clip(0, QUANT_LEVELS).astype(np.uint8)
    return codes, np.stack([step, low], 1).astype(np.float32)


def dequantize_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_rows`: float32 ``code * step + low``; one row or (N, d) rows."""
    scales = np.asarray(scales, np.float32)
    out: np.ndarray = np.asarray(codes, np.float32) * scales[..., :1] + scales[..., 1:]
    return out


class Moments:
    """Streamed first and second moments of rows, in float64, for a PCA that never holds the sample."""

    shift: np.ndarray | None  # the first rows' mean, once rows came

    def __init__(self, dim: int):
        self.n, self.shift = 0, None
        self.sum, self.outer = np.zeros(dim), np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if self.shift is None and len(x):  # moments about a first mean: no cancellation in the covariance
            self.shift = x.mean(0)
        if len(x):
            x = x - self.shift
            self.n += len(x)
            self.sum += x.sum(0)
            self.outer += x.T @ x

    def pca(self, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean (d,), the ``dim`` leading components (dim, d) as ``sklearn.decomposition.PCA`` gives them
        (each component's largest entry positive), and the fraction of the variance they keep."""
        if self.n < 2:
            raise CodecError(f"a PCA needs at least 2 sample rows, got {self.n}")
        assert self.shift is not None  # set when the first rows came
        m = self.sum / self.n
        cov = (self.outer - self.n * np.outer(m, m)) / (self.n - 1)
        var, vec = np.linalg.eigh(cov)
        order = np.argsort(var)[::-1][:dim]
        comps = vec[:, order].T
        comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
        return m + self.shift, comps, float(np.maximum(var[order], 0).sum() / max(np.maximum(var, 0).sum(), 1e-30))


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class FeatureCodec:
    """A ``cache.compress`` choice with its projection (for ``pca`` and ``pca_int8``)."""

    compress: str = "none"
    mean: np.ndarray | None = None  # (d,) float32
    components: np.ndarray | None = None  # (k, d) float32

    def __post_init__(self) -> None:
        if self.compress not in ("none", "int8", "pca", "pca_int8"):
            raise CodecError(f"cache.compress must be none, int8, pca or pca_int8; got {self.compress!r}")
        if self.compress.startswith("pca") and self.components is None:
            raise CodecError(f"cache.compress={self.compress} needs the projection fitted on the training split")
        if self.components is not None:
            self.mean = np.asarray(self.mean, np.float32)
            self.components = np.asarray(self.components, np.float32)

    @property
    def int8(self) -> bool:
        return self.compress.endswith("int8")

    def dim(self, feature_dim: int) -> int:
        """Values stored (and read by the head) per patch, for trunk features of ``feature_dim``."""
        return feature_dim if self.components is None else len(self.components)

    def layout(self, feature_dim: int) -> dict[str, tuple[np.dtype, int]]:
        """The stored arrays: name -> (dtype, values per row)."""
        dim = self.dim(feature_dim)
        return stored_layout(self.compress, dim)

    def encode(self, features: Any) -> dict[str, np.ndarray]:
        """(N, d) trunk features -> the stored arrays of their rows."""
        half = _to_numpy(features.half() if isinstance(features, torch.Tensor) else features).astype(
            np.float16, copy=False
        )
        if self.components is None and not self.int8:
            return {"features": half}  # the fp16 rows as they are: no round trip through fp32
        x = half.astype(np.float32)
        if self.components is not None:
            x = (x - cast(np.ndarray, self.mean)) @ self.components.T  # the mean is set with the components
        if self.int8:
            codes, scales = quantize_rows(x)
            return {"features": codes, "scales": scales}
        return {"features": x.astype(np.float16)}

    def roundtrip(self, features: Any) -> np.ndarray:
        """(N, d) trunk features -> float32 rows as the head reads them from a cache of this codec."""
        return decode_rows(**self.encode(features))

    def unproject(self, rows: Any) -> np.ndarray:
        """Decoded rows -> float32 rows in the trunk's space (the same rows without a projection).

        Pooling a feature over patches by its maximum (the fused SVM, the linear baselines) means
        something in the trunk's space, where the features are non-negative responses; the maximum
        of a signed projection does not.
        """
        rows = np.asarray(rows, np.float32)
        out: np.ndarray = rows if self.components is None else rows @ self.components + self.mean
        return out

    @property
    def digest(self) -> str:
        """Identity of the projection's values (empty without one)."""
        if self.components is None:
            return ""
        mean = cast(np.ndarray, self.mean)  # set with the components
        return hashlib.sha256(mean.tobytes() + self.components.tobytes()).hexdigest()[:20]

    def fields(self) -> dict[str, str]:
        """What a cache of this codec adds to its key (nothing for ``none``, so fp16 caches keep theirs)."""
        if self.compress == "none":
            return {}
        out = {"compress": self.compress}
        if self.components is not None:
            out["projection"] = self.digest
        return out

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: plain values and tensors only (``torch.load(weights_only=True)`` reads them)."""
        out: dict[str, Any] = {"compress": self.compress}
        if self.components is not None:
            out.update(mean=torch.from_numpy(self.mean), components=torch.from_numpy(self.components))
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> FeatureCodec:
        """The codec a checkpoint was trained with (``none`` for checkpoints written before codecs)."""
        if not state:
            return cls()
        proj = {k: _to_numpy(state[k]) for k in ("mean", "components") if k in state}
        return cls(state["compress"], **proj)


def stored_layout(compress: str, dim: int) -> dict[str, tuple[np.dtype, int]]:
    """The arrays a cache of ``compress`` stores, with ``dim`` values per row: name -> (dtype, width)."""
    if compress.endswith("int8"):
        return {"features": (np.dtype(np.uint8), dim), "scales": (np.dtype(np.float32), 2)}
    return {"features": (np.dtype(np.float16), dim)}


def decode_rows(features: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored rows -> float32 rows."""
    if scales is None:
        return np.asarray(features, np.float32)
    return dequantize_rows(features, scales)
