"""The training loop on cached trunk features: patch loss (boxes), image loss (images), or both.

- ``boxes``: batches of patches; every positive and a fresh ``bg_rate`` share of background each
  epoch, softmax cross-entropy over the classes and background (the paper).
- ``images``: batches of whole images; each class's patch evidence is pooled into an image logit
  (``patchnet.pooling``) and meets the image labels in a binary cross-entropy (label 0 left out).
- ``both``: batches of whole images, the image loss plus the patch loss on their positives and a
  ``bg_rate`` share of their background, from one forward pass.

With ``train.unlock`` the trunk's last stages train too: the cache holds the maps at the boundary
below them, and every supervision steps on batches of whole images, whose maps run through the
unlocked stages before their patches are pooled and fed to the head.

One ``TrainState`` owns everything that a resumed run must get back. ``run_epoch`` does the steps,
``end_epoch`` evaluates on held-out training images, steps the schedule and writes checkpoints;
``last.pt`` is only written from a consistent state. Epoch e draws its order and its background
from a generator seeded by ``(seed, e)``, so a killed epoch replays exactly on resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbones import backbone_spec, build_backbone, unlock_split
from .cache import FeatureStore, MapStore, build_features, build_maps, feature_codec
from .calibration import calibrate
from .codec import FeatureCodec
from .datasets import Dataset, DatasetError, open_split
from .errors import PatchnetError
from .extract import ImageMaps, PatchExtractor, UnlockedStages, build_extractor, resolve_precision
from .infer import evaluate, evaluation_items, image_scores
from .linear import Fusion, SplitFeatures, fit_fusion, fit_linear, linear_arrays
from .metrics import APTable
from .model import AdaptationHead, CheckpointError, check_compatible, load_checkpoint, load_head, save_checkpoint
from .pooling import gather_items, patch_values, pool, pool_features
from .recipe import Recipe, recipe_from_dict, save_recipe
from .sampler import IGNORE, MULTI, label_patches

log = logging.getLogger("patchnet")

__all__ = ["train", "TrainState", "TrainingError", "SplitData", "prepare_split", "build_extractor"]


class TrainingError(PatchnetError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class SplitData:
    """A split with its cached features and the training label of every cached patch."""

    dataset: Dataset
    store: FeatureStore  # a MapStore with train.unlock
    labels: np.ndarray  # (P,) int64: class, C for background, IGNORE, or MULTI
    multi_rows: np.ndarray  # (M,) sorted patch indices labelled MULTI
    multi_targets: np.ndarray  # (M, C) bool: their classes

    def image_labels(self, items: np.ndarray) -> np.ndarray:
        return self.dataset.labels()[self.store.record[items]]


def patch_labels(store: FeatureStore, dataset: Dataset, multilabel: bool = False):
    """Labels of all cached patches (view 0: the annotations; augmented views: their own boxes).

    Returns ``(labels, multi_rows, multi_targets)``; the last two are empty without ``multilabel``.
    """
    num_classes = len(dataset.classes)
    labels = np.full(store.num_patches, IGNORE, np.int64)
    rows, targets = [], []
    for i in range(len(store)):
        if not store.ok[i]:
            continue
        rec = dataset.records[store.record[i]]
        objects = (rec.boxes, rec.box_classes, rec.box_difficult) if store.view[i] == 0 else store.item_objects(i)
        s = store.item_slice(i)
        out = label_patches(store.patch_boxes[s], *objects, num_classes, image_labels=rec.labels, multilabel=multilabel)
        if multilabel:
            out, t = out
            multi = np.flatnonzero(out == MULTI)
            rows.append(multi + s.start), targets.append(t[multi])
        labels[s] = out
    if rows:
        return labels, np.concatenate(rows), np.concatenate(targets)
    return labels, np.zeros(0, np.int64), np.zeros((0, num_classes), bool)


def prepare_split(recipe: Recipe, split: str, extractor: PatchExtractor, views: int = 0,
                  progress: bool = True, codec: FeatureCodec | None = None,
                  classes: list[str] | None = None) -> SplitData:
    """Open a split, build (or reuse) its feature cache, and label its patches where boxes are used.

    ``codec``: how the cache stores the rows; default the recipe's (``patchnet.cache.feature_codec``).
    With ``train.unlock`` the cache holds the maps below the unlocked stages instead (``build_maps``).
    ``classes``: the class list to read the split with (the training split's, for the other splits).
    """
    dataset = open_split(recipe.data, split, classes)
    if recipe.train.supervision != "images" and not dataset.has_boxes:
        raise DatasetError(f"{dataset.name} has no boxes, so train.supervision={recipe.train.supervision} has no "
                              "patch labels; use --set train.supervision=images to learn from image labels alone")
    if recipe.train.unlock:
        store = build_maps(recipe, dataset, extractor, views=views, progress=progress)
    else:
        store = build_features(recipe, dataset, extractor, views=views, progress=progress, codec=codec)
    if recipe.train.supervision == "images":
        c = len(dataset.classes)
        return SplitData(dataset, store, np.full(store.num_patches, IGNORE, np.int64), np.zeros(0, np.int64),
                         np.zeros((0, c), bool))
    return SplitData(dataset, store, *patch_labels(store, dataset, recipe.train.multilabel))


def holdout_records(num_records: int, fraction: float, seed: int) -> np.ndarray:
    """The training records held out to choose best.pt on: a fixed random ``fraction`` of them."""
    n = int(round(fraction * num_records))
    if fraction > 0 and num_records > 1:
        n = min(max(n, 1), num_records - 1)
    return np.sort(np.random.default_rng([seed, 7919]).permutation(num_records)[:n])


def held_out(store: FeatureStore, train_data: SplitData, select) -> np.ndarray:
    """(items,) bool: the store items of held-out training images, every augmented view included."""
    if select is None or select[0] is not train_data:
        return np.zeros(len(store), bool)
    return np.isin(store.record, store.record[select[1]])


def is_positive(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Patches that train as positives: one class, or several (MULTI)."""
    return ((labels >= 0) & (labels < num_classes)) | (labels == MULTI)


def epoch_indices(labels: np.ndarray, num_classes: int, bg_rate: float, seed: int, epoch: int) -> np.ndarray:
    """Shuffled patch indices of one epoch: all positives and a fresh ``bg_rate`` share of background."""
    rng = np.random.default_rng([seed, epoch])
    positives = np.flatnonzero(is_positive(labels, num_classes))
    background = np.flatnonzero(labels == num_classes)
    chosen = background[rng.random(len(background)) < bg_rate]
    return rng.permutation(np.concatenate([positives, chosen]))


def patch_targets(labels: np.ndarray, index: np.ndarray, data: SplitData, num_classes: int) -> torch.Tensor:
    """(N, C + 1) target distributions of patches: one-hot, or spread evenly over a MULTI patch's classes."""
    t = np.zeros((len(labels), num_classes + 1), np.float32)
    single = labels >= 0
    t[np.flatnonzero(single), labels[single]] = 1.0
    multi = np.flatnonzero(labels == MULTI)
    if len(multi):
        m = data.multi_targets[np.searchsorted(data.multi_rows, index[multi])].astype(np.float32)
        t[multi, :num_classes] = m / m.sum(1, keepdims=True)
    return torch.from_numpy(t)


def image_loss(image_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of (I, C) pooled image logits against 1/-1/0 labels; 0 (difficult only) is left out."""
    known = labels != 0
    if not known.any():
        return image_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(image_logits[known], (labels[known] > 0).float())


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group when started by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def make_optimizer(head: AdaptationHead, recipe: Recipe, stages: UnlockedStages | None = None) -> torch.optim.SGD:
    """SGD with all parameter groups from the start (weights decayed, biases not), so resume matches.

    Unlocked stages get two groups of their own at ``train.unlock_lr`` x ``train.lr``: the convolutions,
    decayed, and the BatchNorm weights and biases, not.
    """
    t = recipe.train
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in head.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "weight_decay": t.weight_decay}, {"params": biases, "weight_decay": 0.0}]
    if stages is not None:
        trunk, lr = [p for _, p in stages.trainable()], t.lr * t.unlock_lr
        groups += [{"params": [p for p in trunk if p.ndim > 1], "weight_decay": t.weight_decay, "lr": lr},
                   {"params": [p for p in trunk if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype (``train.precision``); fp16 only on CUDA, where gradients are loss-scaled."""
    dtype = resolve_precision(precision, device)
    return torch.bfloat16 if dtype == torch.float16 and device.type != "cuda" else dtype


class MapsAndHead(nn.Module):
    """The unlocked stages and the head as one module (``train.unlock``), so that DDP averages both's gradients."""

    def __init__(self, stages: UnlockedStages, head: AdaptationHead):
        super().__init__()
        self.stages, self.head = stages, head

    def forward(self, items: list[ImageMaps]) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch features of ``items`` and their logits."""
        x = self.stages(items)
        return x, self.head(x)


class LRSchedule:
    """Step decays at fractions of the run, or division by 10 when the loss plateaus (at most ``max_decays``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: Recipe):
        self.optimizer, self.t = optimizer, recipe.train
        self.decays, self.best, self.bad_epochs = 0, math.inf, 0
        self.milestones = sorted({max(1, round(f * self.t.epochs)) for f in self.t.milestones})

    def step(self, epoch_done: int, loss: float) -> bool:
        """Update after ``epoch_done`` epochs; False when a plateau comes after the last decay (stop)."""
        if self.t.schedule == "step":
            if epoch_done in self.milestones:
                self._decay()
            return True
        if loss < self.best * (1 - 1e-3):
            self.best, self.bad_epochs = loss, 0
            return True
        self.bad_epochs += 1
        if self.bad_epochs > self.t.plateau_patience:
            if self.decays >= self.t.max_decays:
                return False
            self._decay()
            self.bad_epochs, self.best = 0, loss
        return True

    def _decay(self) -> None:
        self.decays += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.1

    def state_dict(self) -> dict:
        return {"decays": self.decays, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.decays, self.best, self.bad_epochs = state["decays"], state["best"], state["bad_epochs"]


def _accuracy_counts(logits: torch.Tensor, labels: np.ndarray) -> tuple[int, int]:
    """Correct arg-max predictions among the single-label patches, and their number."""
    single = labels >= 0
    return int((logits.argmax(1).cpu().numpy() == labels)[single].sum()), int(single.sum())


def _zero_carry() -> dict:
    return {"loss_sum": 0.0, "steps": 0, "correct": 0, "patches": 0}


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainState:
    """Everything a run must get back on resume: head (and unlocked stages), optimizer, schedule, counters,
    sums and RNG states.

    ``rng`` is the generators' state at the start of step ``step`` of epoch ``epoch``, so that a
    resumed epoch draws the same dropout masks as an uninterrupted one. ``carry`` holds this
    process's running sums of the epoch (per rank under DDP).
    """

    def __init__(self, head: AdaptationHead, recipe: Recipe, device: torch.device,
                 stages: UnlockedStages | None = None):
        self.head, self.stages, self.device = head, stages, device
        self.optimizer = make_optimizer(head, recipe, stages)
        self.schedule = LRSchedule(self.optimizer, recipe)
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.history: list[dict] = []
        self.carry = _zero_carry()
        self.calibration: dict | None = None
        self.rng = _rng_state(device)

    def state_dict(self) -> dict:
        trunk = {} if self.stages is None else {"trunk": {k: v.cpu() for k, v in self.stages.state().items()}}
        return {"head": self.head.state_dict(), **trunk, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_map07": self.best, "history": list(self.history), "carry": dict(self.carry),
                "rng": dict(self.rng), "calibration": self.calibration}

    def load_state_dict(self, state: dict, path: str | Path = "the checkpoint") -> None:
        load_head(self.head, state, path)
        if self.stages is not None:
            self.stages.load(state["trunk"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best_map07"]
        self.history, self.calibration = list(state["history"]), state.get("calibration")
        self.carry = dict(state["carry"])
        self.rng = dict(state["rng"])
        _set_rng_state(self.rng, self.device)


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_map07: float  # on the selection images (held-out training images or data.select_split)
    table: APTable | None  # last.pt on data.val_split, for reporting
    seconds: float


class Trainer:
    """Runs the epochs of one recipe on prepared splits (see the module docstring)."""

    def __init__(self, recipe: Recipe, train_data: SplitData, select: tuple[SplitData, np.ndarray] | None,
                 state: TrainState, extra: dict, progress: bool = True):
        self.recipe, self.t, self.data, self.select, self.state = recipe, recipe.train, train_data, select, state
        self.extra, self.progress = extra, progress
        self.rank, self.world = _rank_world()
        self.num_classes = len(train_data.dataset.classes)
        net = state.head if state.stages is None else MapsAndHead(state.stages, state.head)
        self.model = torch.nn.parallel.DistributedDataParallel(net) if self.world > 1 else net
        run_dir = recipe.run_dir
        self.last_path, self.best_path = run_dir / "last.pt", run_dir / "best.pt"
        store = train_data.store
        held = held_out(store, train_data, select)
        self.train_items = np.flatnonzero(store.ok & ~held)
        # held-out images, and their augmented views, never train
        self.labels = np.where(np.repeat(held, np.diff(store.offsets)), IGNORE, train_data.labels)
        self.writer = None
        self.epoch_seconds = 0.0  # of the last run_epoch (0 when resuming at end_epoch)
        self.dtype = autocast_dtype(self.t.precision, state.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> None:
        if self.rank == 0:
            save_checkpoint({**self.state.state_dict(), **self.extra}, path)

    # ------------------------------------------------------------------ the two halves of an epoch
    def run_epoch(self) -> None:
        """The remaining steps of the current epoch; the state stays consistent after every step."""
        s, t = self.state, self.t
        images = t.supervision != "boxes" or s.stages is not None  # batches of whole images
        order = (np.random.default_rng([t.seed, s.epoch]).permutation(self.train_items) if images
                 else epoch_indices(self.labels, self.num_classes, t.bg_rate, t.seed, s.epoch))
        per_rank = max(1, (t.image_batch if images else t.batch_size) // (1 if images else self.world))
        # whole batches only, so that one process and several see the same global batches
        steps = max(1, len(order) // (per_rank * self.world))
        order = order[self.rank::self.world]
        keep_bg = (np.random.default_rng([t.seed, s.epoch, 1]).random(len(self.labels)) < t.bg_rate
                   if images and t.supervision != "images" else None)
        s.head.train()
        bar = tqdm(total=steps, initial=s.step, desc=f"epoch {s.epoch + 1}/{t.epochs}", unit="batch",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True, leave=False)
        tick, seen = time.perf_counter(), 0
        while s.step < steps:
            batch = np.sort(order[s.step * per_rank:(s.step + 1) * per_rank])
            loss, correct, patches, n = (self._image_step(batch, keep_bg) if images else self._patch_step(batch))
            with hold_interrupts():  # the update and the step counter move together
                s.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(s.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    s.optimizer.step()
                c = s.carry
                s.carry = {"loss_sum": c["loss_sum"] + loss.item(), "steps": c["steps"] + 1,
                           "correct": c["correct"] + correct, "patches": c["patches"] + patches}
                s.step, s.rng = s.step + 1, _rng_state(s.device)
            seen += n
            bar.update(1)
            bar.set_postfix(loss=f"{s.carry['loss_sum'] / s.carry['steps']:.4f}",
                            patches_s=f"{seen / max(time.perf_counter() - tick, 1e-9):.0f}", refresh=False)
        bar.close()
        self.epoch_seconds = time.perf_counter() - tick

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in fp32; the head's matrix products run under autocast (``train.precision``)."""
        device = self.state.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(x.to(device)).float()

    def _patch_loss(self, logits: torch.Tensor, labels: np.ndarray, index: np.ndarray) -> torch.Tensor:
        if self.t.multilabel:
            return F.cross_entropy(logits, patch_targets(labels, index, self.data, self.num_classes).to(logits.device))
        return F.cross_entropy(logits, torch.from_numpy(labels).to(logits.device))

    def _patch_step(self, idx: np.ndarray):
        x = torch.from_numpy(self.data.store.rows[idx])
        labels = self.labels[idx]
        logits = self._forward(x)
        loss = self._patch_loss(logits, labels, idx)
        self._check(loss, x, labels)
        return (loss, *_accuracy_counts(logits, labels), len(idx))

    def _image_step(self, items: np.ndarray, keep_bg: np.ndarray | None):
        """A step on whole images: the image loss (images, both), the patch loss (both; boxes with unlock)."""
        store, sup = self.data.store, self.t.supervision
        counts = np.diff(store.offsets)[items]
        index = np.concatenate([np.arange(store.offsets[i], store.offsets[i + 1]) for i in items])
        labels = self.labels[index]
        train = (is_positive(labels, self.num_classes) | ((labels == self.num_classes) & keep_bg[index])
                 if sup != "images" else None)
        if self.state.stages is None:
            x = torch.from_numpy(gather_items(store.rows, store.offsets, items))
            logits = self._forward(x)
        else:  # the patch loss alone needs the features of the trained patches only
            x, logits = self._forward_maps(items, counts, train if sup == "boxes" else None)
        loss, correct, patches = None, 0, 0
        if sup != "boxes":
            image_logits = pool(patch_values(logits, self.recipe.pool.name), counts, self.recipe.pool)
            loss = image_loss(image_logits, torch.from_numpy(self.data.image_labels(items)).to(logits.device))
            if sup == "both":
                loss = self.t.image_weight * loss
        if sup != "images" and train.any():
            rows = np.flatnonzero(train) if sup != "boxes" else np.arange(int(train.sum()))
            rows = torch.from_numpy(rows).to(logits.device)
            patch = self._patch_loss(logits[rows], labels[train], index[train])
            loss = patch if loss is None else loss + patch
            correct, patches = _accuracy_counts(logits[rows], labels[train])
        if loss is None:  # no patch of these images trains (boxes): a step without a gradient
            loss = logits.sum() * 0.0
        self._check(loss, x, None)
        return loss, correct, patches, len(x)

    def _forward_maps(self, items: np.ndarray, counts: np.ndarray, rows: np.ndarray | None):
        """Features and fp32 logits of the patches of ``items`` (those where ``rows`` is set, if given) through
        the unlocked stages and the head, under autocast (``train.precision``)."""
        maps = [self.data.store.item_maps(i) for i in items]
        if rows is not None:
            ends = np.cumsum(counts)
            maps = [m.subset(np.flatnonzero(rows[e - n:e])) for m, n, e in zip(maps, counts, ends)]
        device = self.state.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            x, logits = self.model(maps)
        return x.detach().float(), logits.float()

    def _check(self, loss: torch.Tensor, x: torch.Tensor, labels: np.ndarray | None) -> None:
        if torch.isfinite(loss):
            return
        s = self.state
        counts = (f"; labels {np.bincount(labels[labels >= 0], minlength=self.num_classes + 1).tolist()}"
                  if labels is not None else "")
        raise TrainingError(
            f"loss became {loss.item()} at epoch {s.epoch + 1}, step {s.step + 1} "
            f"(lr {s.optimizer.param_groups[0]['lr']:.3g}); last batch: features mean {x.mean():.3g}, "
            f"std {x.std():.3g}, max |x| {x.abs().max():.3g}, any non-finite: {not torch.isfinite(x).all()}{counts}. "
            f"{self.last_path} is left as it was; lower train.lr, or check the feature cache "
            f"(patchnet cache verify --cache-dir {Path(self.recipe.runtime.cache_dir)}).")

    def end_epoch(self) -> bool:
        """Evaluate, step the schedule, log and checkpoint; False when the plateau schedule stops the run.

        Everything is computed first and committed at the end, so an interrupt before the commit
        leaves the state at "all steps of epoch E done": resume re-runs exactly this method.
        """
        s, t = self.state, self.t
        c = s.carry
        totals = torch.tensor([c["loss_sum"], c["steps"], c["correct"], c["patches"]], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals)
        loss, acc = (totals[0] / max(totals[1], 1)).item(), (totals[2] / max(totals[3], 1)).item()
        done = s.epoch + 1
        record = {"epoch": done, "loss": loss, "patch_acc": acc, "lr": s.optimizer.param_groups[0]["lr"],
                  "seconds": round(self.epoch_seconds, 3)}
        table = scores = None
        if self.select is not None and (done % t.eval_every == 0 or done == t.epochs) and self.rank == 0:
            data, items = self.select
            table, scores = evaluate(s.head, data.store, data.dataset, items, self.recipe.pool, self.recipe.infer_pool)
            record.update(select_map07=table.map07, select_map=table.map)
        calibration = (_calibration(self.recipe, scores, self.select[0].image_labels(self.select[1]))
                       if scores is not None else s.calibration)
        improved = table is not None and table.map07 > s.best
        with hold_interrupts():  # commit
            keep_going = s.schedule.step(done, loss)
            s.history.append(record)
            s.epoch, s.step, s.carry, s.calibration = done, 0, _zero_carry(), calibration
            if improved:
                s.best = table.map07
            if improved or (self.select is None and self.rank == 0):
                self.save(self.best_path)  # without selection images, the last head is the best we know
            self.save(self.last_path)
        self._log(record, table)
        return keep_going

    def _log(self, record: dict, table: APTable | None) -> None:
        if self.rank:
            return
        if self.writer is not None:
            e = record["epoch"]
            for key in ("loss", "patch_acc", "lr"):
                self.writer.add_scalar(f"train/{key}", record[key], e)
            if table is not None:
                self.writer.add_scalar("select/mAP_11pt", table.map07, e)
                self.writer.add_scalar("select/mAP_envelope", table.map, e)
                if self.recipe.runtime.heatmaps:
                    from .heatmaps import log_heatmaps  # matplotlib: only when heatmaps are logged

                    log_heatmaps(self.writer, self.state.head, self.select[0], self.recipe, e, self.select[1])
            self.writer.flush()
        sel = (f", selection mAP {100 * record['select_map07']:.1f} (11-pt) {100 * record['select_map']:.1f} (env)"
               if "select_map07" in record else "")
        what = "patch accuracy" if self.t.supervision != "images" else "-"
        log.info("epoch %d: loss %.4f, %s %.3f, lr %.3g%s (%.0f s)", record["epoch"], record["loss"], what,
                 record["patch_acc"], record["lr"], sel, record["seconds"])

    def fit(self) -> None:
        s = self.state
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.recipe.run_dir / "tensorboard"))
        try:
            while s.epoch < self.t.epochs:
                self.run_epoch()
                if not self.end_epoch():
                    log.info("loss plateaued after %d learning-rate decays: stopping at epoch %d",
                             s.schedule.decays, s.epoch)
                    break
        except KeyboardInterrupt:
            # every step and end_epoch commit leaves the state consistent; no collective calls here
            with hold_interrupts():  # a second Ctrl-C must not cut the save short
                if self.rank:
                    _carry_path(self.recipe.run_dir, self.rank).write_text(json.dumps(self.state.carry))
                self.save(self.last_path)
            log.warning("interrupted: saved %s at epoch %d, step %d; continue with --resume", self.last_path,
                        s.epoch + 1, s.step)
            raise
        finally:
            if self.writer is not None:
                self.writer.close()


@contextmanager
def hold_interrupts():
    """Hold SIGINT until the block ends, then deliver it: a Ctrl-C never lands between the halves of a commit
    (an optimizer step and its step counter, a schedule step and its epoch counter)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, held[0])
        elif held and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _carry_path(run_dir: Path, rank: int) -> Path:
    """Under DDP an interrupted rank keeps its own running sums here (rank 0's are in last.pt)."""
    return run_dir / f"carry.rank{rank}.json"


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the adaptation head of ``recipe``; checkpoints go to ``recipe.run_dir``."""
    init_distributed()
    rank, world = _rank_world()
    started = time.perf_counter()
    run_dir = recipe.run_dir
    last_path = run_dir / "last.pt"
    saved = None
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"--resume: {last_path} does not exist; start without --resume")
        saved = load_checkpoint(last_path)
        if _resume_key(recipe_from_dict(saved["recipe"]).to_dict()) != _resume_key(recipe.to_dict()):
            raise CheckpointError(f"--resume: {last_path} was made with another recipe; resume with the saved one: "
                                  f"patchnet train --recipe {run_dir / 'recipe.yaml'} --resume")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")

    backbone = None
    if recipe.train.unlock:  # the trunk whose last stages train; the extractor runs a fused copy of its frozen part
        b = recipe.backbone
        backbone = build_backbone(b.name, b.weights, b.input_size, b.layer)
    extractor = build_extractor(recipe) if backbone is None else build_extractor(recipe, backbone)
    if recipe.train.unlock:  # its maps are stored as they are (the recipe refuses cache.compress with it)
        codec = FeatureCodec()
    else:  # a resumed run keeps the projection its head was trained on
        codec = FeatureCodec.from_state(saved.get("codec")) if saved is not None else feature_codec(recipe, extractor,
                                                                                                     progress)
    train_data = prepare_split(recipe, recipe.data.train_split, extractor, views=recipe.aug.views, progress=progress,
                               codec=codec)
    classes = train_data.dataset.classes
    select = _selection(recipe, train_data, extractor, progress, codec)
    _log_split("train", train_data, select)
    val = (prepare_split(recipe, recipe.data.val_split, extractor, progress=progress, codec=codec, classes=classes)
           if recipe.data.val_split else None)

    torch.manual_seed(recipe.train.seed)
    device = extractor.device
    head = AdaptationHead(train_data.store.feature_dim, len(classes), recipe.head.hidden, recipe.head.dropout).to(device)
    stages = None
    if backbone is not None:
        stages = UnlockedStages(backbone, unlock_split(backbone_spec(backbone.name), recipe.train.unlock)).to(
            device, memory_format=torch.channels_last if recipe.backbone.channels_last else torch.contiguous_format)
        for data in (train_data, select[0] if select else None, val):
            if data is not None:  # their features come from the stages as they are when read
                data.store.attach(stages, autocast_dtype(recipe.train.precision, device))
    state = TrainState(head, recipe, device, stages)
    # feature_dim: the trunk's; the head reads codec.dim(feature_dim) values, the codec's projection applied
    extra = {"recipe": recipe.to_dict(), "classes": classes, "feature_dim": extractor.feature_dim,
             "weights_id": extractor.backbone.weights_id, "codec": codec.state_dict()}
    if saved is not None:
        check_compatible(saved, last_path, recipe.backbone.name, classes, extractor.feature_dim,
                         extractor.backbone.weights_id)
        state.load_state_dict(saved, last_path)
        if rank:
            carry = _carry_path(run_dir, rank)
            state.carry = json.loads(carry.read_text()) if carry.is_file() else _zero_carry()
        log.info("resuming %s at epoch %d, step %d", run_dir, state.epoch + 1, state.step)
    trainer = Trainer(recipe, train_data, select, state, extra, progress)
    trainer.fit()
    if rank:
        _carry_path(run_dir, rank).unlink(missing_ok=True)
    fusion = None
    if recipe.infer.fuse and select is not None and rank == 0:
        fusion = fuse_checkpoints(recipe, train_data, select, [trainer.best_path, trainer.last_path], stages)[-1]
    table = None
    if val is not None and rank == 0:  # reported, never used to choose
        table, _ = evaluate(head, val.store, val.dataset, evaluation_items(val.store), recipe.pool, recipe.infer_pool,
                            fusion)
        log.info("last.pt on %s: mAP %.1f (11-pt) %.1f (envelope)", recipe.data.val_split, 100 * table.map07,
                 100 * table.map)
    return TrainResult(run_dir, state.epoch, state.best, table, time.perf_counter() - started)


def _calibration(recipe: Recipe, scores: np.ndarray, labels: np.ndarray, fused: bool = False) -> dict:
    """The checkpoint entry of a calibration of held-out scores, with the power it holds for."""
    out = calibrate(scores, labels, recipe.infer_pool, fused).to_dict()
    if recipe.infer_pool == "power":
        out["k"] = recipe.pool.k
    return out


def fuse_checkpoints(recipe: Recipe, train_data: SplitData, select: tuple[SplitData, np.ndarray],
                     paths: list[Path], stages: UnlockedStages | None = None) -> list[Fusion]:
    """Fit the max-pool linear SVM on the training images and fuse it into each checkpoint (``infer.fuse``).

    The SVM never sees the selection images; the fusion weight, the z-score statistics and the
    calibration of the fused scores are fitted on them. Returns the fusion written to each path.
    With unlocked ``stages`` the features are each checkpoint's own: its stages are loaded into
    ``stages`` (the last path's stay) and the SVM is fitted anew.
    """
    store, sel, held = train_data.store, select[0], select[1]
    items = np.flatnonzero(store.ok & ~held_out(store, train_data, select))
    labels = sel.image_labels(held)

    def fit_svm():
        log.info("fusion: fitting the max-pool linear SVM on %d training items", len(items))
        pooled = pool_features(store.trunk_rows, store.offsets, items, "max")
        ids = [train_data.dataset.records[r].image_id for r in store.record[items]]
        model = fit_linear(SplitFeatures(ids, pooled, train_data.image_labels(items), train_data.dataset.classes),
                           seed=recipe.train.seed, progress=False)
        return (*linear_arrays(model, pooled.shape[1]), pool_features(sel.store.trunk_rows, sel.store.offsets, held))

    fusions, svm = [], None
    for path in paths:
        state = load_checkpoint(path)
        if stages is not None:
            stages.load(state["trunk"])
        if svm is None or stages is not None:
            svm = fit_svm()
        coef, intercept, held_pooled = svm
        head = AdaptationHead(store.feature_dim, len(train_data.dataset.classes), recipe.head.hidden,
                              recipe.head.dropout)
        load_head(head, state, path)
        scores = image_scores(head, sel.store, held, recipe.pool, recipe.infer_pool)
        fusion, tried = fit_fusion(recipe.infer_pool, coef, intercept, scores, held_pooled, labels)
        log.info("fusion for %s: selection mAP by weight %s; chose %g", path.name,
                 ", ".join(f"{w:g}: {100 * m:.1f}" for w, m in tried.items()), fusion.weight)
        calibration = _calibration(recipe, fusion.combine(scores, fusion.decision(held_pooled)), labels, fused=True)
        save_checkpoint({**state, "fusion": {**fusion.to_dict(), "k": recipe.pool.k}, "calibration": calibration},
                        path)
        fusions.append(fusion)
    return fusions


def _selection(recipe: Recipe, train_data: SplitData, extractor, progress: bool, codec: FeatureCodec | None = None):
    """The images best.pt is chosen on: ``data.select_split``, else ``train.holdout`` of the training images."""
    if recipe.data.select_split:
        if recipe.data.select_split == recipe.data.val_split:
            raise CheckpointError(f"data.select_split and data.val_split are both {recipe.data.val_split!r}: a "
                                  "checkpoint chosen on the reported split overstates it; choose on another split "
                                  "or leave select_split empty to hold out train.holdout of the training images")
        data = prepare_split(recipe, recipe.data.select_split, extractor, progress=progress, codec=codec,
                             classes=train_data.dataset.classes)
        return data, evaluation_items(data.store)
    if recipe.train.holdout <= 0:
        return None
    held = holdout_records(len(train_data.dataset), recipe.train.holdout, recipe.train.seed)
    return train_data, evaluation_items(train_data.store, held)


def _resume_key(values: dict) -> dict:
    """What a resumed run must share with the saved one: all but the runtime section and train.epochs
    (a finished run may be extended)."""
    return {**{k: v for k, v in values.items() if k != "runtime"},
            "train": {k: v for k, v in values["train"].items() if k != "epochs"}}


def _log_split(name: str, data: SplitData, select) -> None:
    c = len(data.dataset.classes)
    counts = np.bincount(np.where(data.labels < 0, c + 1, data.labels), minlength=c + 2)
    held = f"; {len(select[1])} images held out to choose best.pt" if select is not None and select[0] is data else ""
    log.info("%s: %d images, %d patches: %d positive, %d background, %d ignored or multi-label%s", name,
             len(data.dataset), len(data.labels), counts[:c].sum(), counts[c], counts[c + 1], held)
