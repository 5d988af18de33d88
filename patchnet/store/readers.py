"""The readers of a complete cache folder: its item index (``ItemIndex``) and, for a feature cache, its rows
memory-mapped and decoded on read (``FeatureStore``, ``Rows``).

A feature cache holds one split's patch features: ``meta.json``, the rows (``features.f16``; or
``features.u8`` and ``scales.f32``, see ``patchnet.store.codec``), ``projection.npz`` with a PCA codec and
``index.npz`` (per item: its patch offsets and boxes, its objects). The other kinds (unlock's maps,
the per-layer vectors) read their own row files beside the same index.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np

from .codec import FeatureCodec, decode_rows, stored_layout
from .integrity import MARKER, damaged_if_unreadable, memmap, open_checked


class Rows:
    """The (P, d) float32 feature rows of a store, decoded on read: ``rows[a:b]``, ``rows[index_array]``, ``rows[i]``.

    With a ``codec``, rows are mapped back through its projection (``FeatureCodec.unproject``).
    Functions that take a feature array (``patchnet.head.pooling``, ``AdaptationHead.logits``) take this too.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, features: np.ndarray, scales: np.ndarray | None = None, codec: FeatureCodec | None = None):
        self.stored, self.scales, self.codec = features, scales, codec
        # a codec is given only with a projection to map the rows back through
        self.shape = (
            len(features),
            features.shape[1] if codec is None else cast(np.ndarray, codec.components).shape[1],
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        rows = decode_rows(self.stored[index], None if self.scales is None else self.scales[index])
        return rows if self.codec is None else self.codec.unproject(rows)


def row_file(name: str, dtype: np.dtype) -> str:
    """The file that holds the stored row array ``name`` of this dtype (``features.f16``, ``maps.f16``, ...)."""
    return f"{name}.{ {'float16': 'f16', 'uint8': 'u8', 'float32': 'f32'}[dtype.name] }"


class ItemIndex:
    """A complete cache opened read-only: its meta, and per item (an image or an augmented view) its record,
    view, whether it was readable, its patches (offsets into the rows, boxes) and its objects."""

    offsets: np.ndarray  # (items + 1,) first row of each item's patches
    record: np.ndarray  # (items,) the record of each item
    view: np.ndarray  # (items,) 0: the image; v > 0: augmented view v
    ok: np.ndarray  # (items,) False for an unreadable image (no patches)
    patch_boxes: np.ndarray  # (P, 4) every patch, in pixels of its image (or view)
    box_offsets: np.ndarray  # (items + 1,) first object of each item
    boxes: np.ndarray  # (K, 4) objects (transformed for augmented views)
    box_classes: np.ndarray
    box_difficult: np.ndarray

    def __init__(self, path: Path):
        self.path = path
        self.meta = open_checked(path)
        self.fields, self.feature_dim = self.meta["fields"], self.meta["feature_dim"]
        self.failures: list[str] = self.meta.get("failures", [])
        with damaged_if_unreadable(path, MARKER), np.load(path / MARKER) as idx:
            for name in idx.files:
                setattr(self, name, idx[name])

    def __len__(self) -> int:
        return len(self.record)

    @property
    def num_patches(self) -> int:
        return int(self.offsets[-1])

    def item_slice(self, i: int | np.integer) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def item_objects(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        return self.boxes[s], self.box_classes[s], self.box_difficult[s]


class FeatureStore(ItemIndex):
    """A complete feature cache, opened read-only: feature rows (P, d) memory-mapped, and the item indexes.

    ``rows`` decodes the rows the head reads; ``feature_dim`` is their dimension (``cache.pca_dim``
    after a projection). ``trunk_rows`` maps them back to the trunk's space for features pooled by
    their maximum (the same view as ``rows`` without a projection).
    """

    def __init__(self, path: Path):
        super().__init__(path)
        self.compress: str = self.meta.get("compress", "none")
        arrays = {
            name: memmap(path, row_file(name, dtype), dtype, (self.num_patches, width))
            for name, (dtype, width) in stored_layout(self.compress, self.feature_dim).items()
        }
        self.rows = Rows(**arrays, codec=None)
        projection = {}
        if (path / "projection.npz").is_file():
            with damaged_if_unreadable(path, "projection.npz"), np.load(path / "projection.npz") as z:
                projection = {"mean": z["mean"], "components": z["components"]}
        self.codec = FeatureCodec(self.compress, **projection)
        self.trunk_rows = self.rows if self.codec.components is None else Rows(**arrays, codec=self.codec)
        self._stored = arrays

    def stored_item(self, i: int) -> tuple[dict[str, np.ndarray], np.ndarray] | str:
        """Item ``i`` as stored: its row arrays and patch boxes, or the failure message of an unreadable image."""
        if not self.ok[i]:
            return self.failures[int(np.count_nonzero(~self.ok[:i]))]
        s = self.item_slice(i)
        return {name: np.asarray(a[s]) for name, a in self._stored.items()}, self.patch_boxes[s]
