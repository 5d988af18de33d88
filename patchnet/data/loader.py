"""Decoded images of a split, in order, from worker processes: the one loop every extraction runs on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from .augment import augment, build_pipeline, view_seed
from ..recipe import AugConfig
from ..threads import loader_workers
from .images import DatasetError, load_image
from .records import ImageRecord

log = logging.getLogger("patchnet")


class ItemImages(TorchDataset):
    """Decoded images of ``(record, view)`` items with their boxes; view 0 is the image itself.

    An item is ``(i, image, objects)``: ``image`` a uint8 (3, H, W) tensor and ``objects`` its
    (boxes, classes, difficult); for an unreadable image ``(i, None, message)``.
    """

    def __init__(
        self, records: list[ImageRecord], items: list[tuple[int, int]], aug: AugConfig | None = None, seed: int = 0
    ):
        self.records, self.items, self.seed = records, items, seed
        self.pipeline = build_pipeline(aug) if aug is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        r, view = self.items[i]
        rec = self.records[r]
        try:
            image = load_image(rec.path)
        except DatasetError as e:
            return i, None, str(e)
        objects = (rec.boxes, rec.box_classes, rec.box_difficult)
        if view:
            image, boxes, classes, difficult = augment(
                self.pipeline, image, *objects, seed=view_seed(self.seed, r, view)
            )
            objects = (boxes, classes, difficult)
        return i, torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), tuple(objects)


def iter_images(
    records: list[ImageRecord],
    items: list[tuple[int, int]] | None = None,
    *,
    aug: AugConfig | None = None,
    seed: int = 0,
    workers: int = 0,
    device: torch.device | None = None,
    desc: str = "images",
    progress: bool = True,
    keep_failures: bool = False,
) -> Iterator[tuple[int, torch.Tensor | None, object]]:
    """``(i, image, objects)`` of the ``(record, view)`` items (default: every record's view 0), in order.

    An unreadable image is logged and skipped, or with ``keep_failures`` yielded as ``(i, None,
    message)``. Decoding runs in ``workers`` processes; on a CPU device only on the cores torch leaves
    free (decoders that take the trunk's cores stall its OpenMP threads).
    """
    items = [(r, 0) for r in range(len(records))] if items is None else items
    device = device or torch.device("cpu")
    if device.type == "cpu":
        workers = loader_workers(workers, torch.get_num_threads())
    loader = DataLoader(
        ItemImages(records, items, aug, seed),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
    )
    for i, image, info in tqdm(
        loader, total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True
    ):
        if image is None:
            log.warning("skipped unreadable image: %s", info)
            if not keep_failures:
                continue
        yield i, image, info
