"""The detection head (``train.detector: mil``): boxes learned from image labels by multiple-instance learning over
candidate regions (``patchnet.patches.regions``).

Every region's feature is the classification head's FCa on the region's mean of the trunk's map (FCa is linear
before its ReLU, so the mean of ``W x + b`` over the region is computed once per map cell and pooled: exact,
and a region costs 16 reads of a summed-area table, ``region_mean``); FCa stays frozen, the streams train.

- WSDDN (Bilen and Vedaldi, 2016): a classification stream (softmax over classes) and a detection stream
  (softmax over the image's regions), their product a region's share of each class; summed over regions it
  is the image's score in [0, 1], trained by binary cross-entropy with the image labels.
- OICR (Tang et al., 2017): ``refinements`` classifiers over the classes and background, each trained on the
  pseudo-labels of the one before (the WSDDN scores for the first): per class present, its top region, and
  every region overlapping a top region at IoU >= ``iou`` takes that region's class, the others background,
  each weighted by the top region's score. At test time a region's class scores are the refinements' mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, nms

from ..backbones.regions import region_mean
from ..patches.regions import region_boxes, region_levels
from ..recipe import DetectorConfig


@dataclass
class MILOutput:
    """One image's outputs: WSDDN's (R, C) region scores and (C,) image score, each refinement's (R, C + 1) logits."""

    region_scores: torch.Tensor
    image_scores: torch.Tensor
    refined: list[torch.Tensor]

    def class_scores(self) -> torch.Tensor:
        """(R, C) each region's score per class: the refinements' mean softmax without background (WSDDN's scores
        where there are no refinements)."""
        if not self.refined:
            return self.region_scores
        return torch.stack([z.float().softmax(-1)[:, :-1] for z in self.refined]).mean(0)


class MILHead(nn.Module):
    """The frozen FCa of a classification head, then WSDDN's two streams and OICR's refinements."""

    def __init__(
        self, feature_dim: int, num_classes: int, hidden: int = 2048, refinements: int = 3, context: float = 0.0
    ):
        super().__init__()
        self.num_classes, self.context = num_classes, context
        self.fca = nn.Linear(feature_dim, hidden)
        self.fca.requires_grad_(False)
        self.cls = nn.Linear(hidden, num_classes)
        self.det = nn.Linear(hidden, num_classes)
        self.refine = nn.ModuleList(nn.Linear(hidden, num_classes + 1) for _ in range(refinements))

    def hidden(self, maps: list[torch.Tensor], cells: list[torch.Tensor]) -> torch.Tensor:
        """(R, hidden) region features: ``maps[l]`` a (h, w, d) trunk map, ``cells[l]`` the (R_l, 4) boxes pooled
        from it in its cell units; regions in the order of the levels. With ``context``, (2R, hidden): the
        regions', then their frames' (``frame_means``)."""
        w = self.fca.weight
        regions, frames = [], []
        for fmap, boxes in zip(maps, cells):
            if not len(boxes):
                continue
            h_, w_, d = fmap.shape
            z = (fmap.reshape(-1, d).to(w.dtype) @ w.T).reshape(1, h_, w_, -1).permute(0, 3, 1, 2)
            inner = region_mean(z, boxes, row_sums=True)
            regions.append(inner)
            if self.context:
                frames.append(frame_means(z, boxes, inner, self.context))
        x = torch.cat(regions + frames) if regions else w.new_zeros(0, w.shape[0])
        return F.relu(x + self.fca.bias)

    def forward(self, hidden: torch.Tensor) -> MILOutput:
        """The outputs of one image from its region features (``hidden``'s)."""
        frame = None
        if self.context:
            hidden, frame = hidden.chunk(2)
        layers = [self.cls, self.det, *self.refine]
        # one product for every stream: a few outputs each, separate products ran at a tenth of the speed
        z = F.linear(hidden, torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])).float()
        c = self.num_classes
        det = z[:, c : 2 * c]
        if frame is not None:  # ContextLocNet's contrastive localisation: the region against its frame
            det = det - F.linear(frame, self.det.weight).float()
        scores = z[:, :c].softmax(1) * det.softmax(0)
        image = scores.sum(0).clamp(1e-6, 1 - 1e-6)
        refined = list(torch.split(z[:, 2 * c :], c + 1, dim=1)) if self.refine else []
        return MILOutput(scores, image, refined)


def frame_means(fmap: torch.Tensor, cells: torch.Tensor, inner: torch.Tensor, factor: float) -> torch.Tensor:
    """(N, C) means of a (1, C, h, w) map over the frames of boxes ``cells``: each box grown ``factor`` times about
    its centre, less the box (``inner``: its ``region_mean``). Both are clipped to the map; an empty frame (a box
    filling the map) gets the box's own mean."""
    _, _, h, w = fmap.shape
    x1, y1, x2, y2 = cells.float().unbind(1)
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * factor / 2, (y2 - y1) * factor / 2
    outer_cells = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], 1)
    outer = region_mean(fmap, outer_cells, row_sums=True)

    def area(b: torch.Tensor) -> torch.Tensor:
        bw = b[:, 2].clamp(0, w) - b[:, 0].clamp(0, w)
        bh = b[:, 3].clamp(0, h) - b[:, 1].clamp(0, h)
        return (bw * bh)[:, None]

    a_out, a_in = area(outer_cells), area(cells.float())
    ring = (a_out - a_in).clamp(min=0)
    frame = (outer * a_out - inner * a_in) / ring.clamp(min=1e-6)
    return torch.where(ring > 1e-3 * a_in.clamp(min=1e-6), frame, inner)


def wsddn_loss(image_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of one image's (C,) WSDDN score against its 1/-1/0 labels, summed over the known
    classes (0: difficult only, left out)."""
    known = labels != 0
    target = (labels > 0).float()
    bce = F.binary_cross_entropy(image_scores.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    return (bce * known).sum()


@torch.no_grad()
def pseudo_labels(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """OICR's instance labels of one image's regions from the previous stream's (R, C) ``scores``.

    Each class present (``labels > 0``) takes its top region; a region overlapping a top region at IoU >=
    ``iou`` takes the class of the one it overlaps most, the others background (index C); each region is
    weighted by the score of that top region. Returns (R,) targets and (R,) weights (zero where no class is
    present: the image teaches the refinements nothing).
    """
    num_regions, num_classes = scores.shape
    present = torch.nonzero(labels > 0).flatten()
    targets = torch.full((num_regions,), num_classes, dtype=torch.long, device=scores.device)
    if not len(present) or not num_regions:
        return targets, scores.new_zeros(num_regions)
    top = scores[:, present].argmax(0)  # (P,) the top region of each class present
    top_score = scores[top, present]
    overlap = box_iou(boxes.float(), boxes[top].float())  # (R, P)
    best, which = overlap.max(1)
    targets = torch.where(best >= iou, present[which], targets)
    return targets, top_score[which]


def refine_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """OICR's weighted cross-entropy of one image's (R, C + 1) logits, the regions of an object class and those
    of the background averaged apart and added: a dense grid has about 1 region in 100 near a top region
    (selective search's proposals crowd around objects), and averaged together the background took all."""
    if not len(logits):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.float(), targets, reduction="none") * weights
    fg = targets < logits.shape[1] - 1
    return loss[fg].sum() / fg.sum().clamp(min=1) + loss[~fg].sum() / (~fg).sum().clamp(min=1)


def mil_loss(
    head_out: MILOutput,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    iou: float = 0.5,
    seeds: dict[int, np.ndarray] | None = None,
) -> torch.Tensor:
    """One image's loss: WSDDN's plus each refinement's against the pseudo-labels of the stream before it.

    ``seeds``: class -> a box (pixels) that the first refinement takes as the class's top region instead of
    WSDDN's (the region overlapping it most, weighted 1): the score map's box (``detector.seed: map``)."""
    loss = wsddn_loss(head_out.image_scores, labels)
    previous = head_out.region_scores.detach()
    if seeds:
        previous = previous.clone()
        for c, box in seeds.items():
            overlap = box_iou(boxes.float(), torch.as_tensor(np.asarray(box, np.float32)[None], device=boxes.device))
            previous[:, c] = 0.0
            previous[int(overlap[:, 0].argmax()), c] = 1.0
    for logits in head_out.refined:
        targets, weights = pseudo_labels(boxes, previous, labels, iou)
        loss = loss + refine_loss(logits, targets, weights)
        previous = logits.detach().float().softmax(-1)[:, :-1]
    return loss


def nms_detections(
    boxes: np.ndarray, scores: np.ndarray, classes, iou: float = 0.3, max_boxes: int = 100, min_score: float = 1e-4
) -> list[tuple[int, np.ndarray, float]]:
    """Class-wise non-maximum suppression of one image's (R, 4) boxes with (R, C) scores, for ``classes``: up to
    ``max_boxes`` per class of score at least ``min_score``, as (class, box, score), best first per class."""
    out = []
    b = torch.from_numpy(np.asarray(boxes, np.float32))
    for c in classes:
        s = torch.from_numpy(np.ascontiguousarray(scores[:, c], np.float32))
        keep = torch.nonzero(s >= min_score).flatten()
        if not len(keep):
            keep = s.argmax()[None]  # every class keeps its top region: CorLoc judges it
        kept = keep[nms(b[keep], s[keep], iou)][:max_boxes]
        out += [(int(c), boxes[int(k)], float(scores[int(k), c])) for k in kept]
    return out


@dataclass
class ImageRegions:
    """One image's candidate regions ready for ``MILHead.hidden``: ``boxes`` (R, 4) in pixels, in the order of
    the levels, and per level its map and the cells of its regions."""

    boxes: torch.Tensor
    maps: list[torch.Tensor]
    cells: list[torch.Tensor]


def image_regions(
    maps: list[np.ndarray],
    factors: np.ndarray,
    width: int,
    height: int,
    cfg: DetectorConfig,
    stride: float,
    offset: float,
    input_size: int,
    device: torch.device | str = "cpu",
) -> ImageRegions:
    """The candidate regions of a width x height image whose trunk maps at each pyramid level are ``maps`` ((h, w,
    d) arrays, the image rescaled by ``factors`` (L, 2), x and y), each region pooled from its nearest level."""
    boxes = region_boxes(width, height, cfg.scales, cfg.step, cfg.ratios)
    level = region_levels(boxes, factors[:, 0], input_size)
    order = np.argsort(level, kind="stable")
    boxes, level = boxes[order], level[order]
    cells = []
    for lv, (fx, fy) in enumerate(np.asarray(factors, np.float64)):
        mine = boxes[level == lv] * np.array([fx, fy, fx, fy], np.float32)
        cells.append(torch.from_numpy((mine - offset) / stride).to(device))
    tensors = [torch.from_numpy(np.array(m)).to(device) for m in maps]  # a copy: the cache is read-only
    return ImageRegions(torch.from_numpy(boxes).to(device), tensors, cells)


def detect(
    mil: MILHead, regions: ImageRegions, cfg: DetectorConfig, classes, dtype: torch.dtype | None = None
) -> tuple[list[tuple[int, np.ndarray, float]], np.ndarray]:
    """One image's boxes of ``classes`` after class-wise NMS (``cfg.nms``, ``cfg.max_boxes``) as (class, box,
    score in [0, 1]), and its (C,) WSDDN image scores. ``dtype``: FCa's autocast (the trunk's precision)."""
    device = mil.cls.weight.device
    with torch.inference_mode():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            hidden = mil.hidden(regions.maps, regions.cells)
        out = mil(hidden.float())
    found = nms_detections(
        regions.boxes.cpu().numpy(), out.class_scores().cpu().numpy(), classes, cfg.nms, cfg.max_boxes
    )
    return found, out.image_scores.cpu().numpy()


def load_detector(state: dict, feature_dim: int, num_classes: int, cfg: DetectorConfig) -> MILHead:
    """The detection head of a checkpoint's ``detector`` field (its weights' shapes give the hidden size)."""
    weights = state["head"]
    mil = MILHead(feature_dim, num_classes, int(weights["fca.weight"].shape[0]), cfg.refinements, cfg.context)
    mil.load_state_dict(weights)
    return mil.eval()


def store_regions(store, dataset, item: int, cfg: DetectorConfig, geometry: dict, device) -> ImageRegions:
    """The candidate regions of map store item ``item`` (``image_regions`` on its cached maps: a
    ``patchnet.training.unlock.MapStore`` of ``dataset``)."""
    rec = dataset.records[store.record[item]]
    maps = store.item_maps(item)
    return image_regions(maps.maps, maps.factors, rec.width, rec.height, cfg, device=device, **geometry)
