"""The training loop on cached trunk features: patch loss (boxes), image loss (images), or both.

- ``boxes``: batches of patches; every positive and a fresh ``bg_rate`` share of background each
  epoch, softmax cross-entropy over the classes and background (the paper).
- ``images``: batches of whole images; each class's patch evidence is pooled into an image logit
  (``patchnet.pooling``) and meets the image labels in a binary cross-entropy (label 0 left out).
- ``both``: batches of whole images, the image loss plus the patch loss on their positives and a
  ``bg_rate`` share of their background, from one forward pass.

With ``train.unlock`` the trunk's last stages train too (``patchnet.unlock``): every supervision
steps on batches of whole images, whose cached maps run through the unlocked stages first.

One ``TrainState`` owns everything that a resumed run must get back. ``Trainer.run_epoch`` does the
steps; ``Trainer.end_epoch`` runs the end-of-epoch callbacks (the evaluation on held-out training
images with its calibration and fusion, the checkpoints, the logs) around one commit, so that
``last.pt`` is only written from a consistent state. Epoch e draws its order and its background from
a generator seeded by ``(seed, e)``, so a killed epoch replays exactly on resume.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import backbone_spec, build_backbone, unlock_split
from .calibration import calibrate
from .codec import FeatureCodec
from .datasets import open_split
from .dist import all_sum, init_distributed, rank_world, resolve_precision
from .errors import PatchnetError
from .extract import build_extractor
from .features import cache_spec
from .fusion import Fusion, fit_fusion
from .infer import evaluate, evaluation_items, image_scores
from .linear import SplitFeatures, fit_linear, linear_arrays
from .losses import accuracy_counts, image_loss, is_positive, patch_loss, patch_targets
from .metrics import APTable
from .model import AdaptationHead, CheckpointError, check_compatible, load_checkpoint, load_head, save_checkpoint
from .pooling import gather_items, patch_values, pool, pool_features
from .recipe import Recipe, recipe_from_dict, save_recipe
from .sampler import IGNORE
from .splits import Selection, SplitData, held_out, log_split, prepare_split, selection_split
from .unlock import MapsAndHead, UnlockedStages

log = logging.getLogger("patchnet")

__all__ = ["LRSchedule", "TrainState", "Trainer", "TrainingError", "epoch_indices", "hold_interrupts", "train"]


class TrainingError(PatchnetError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


def epoch_indices(labels: np.ndarray, num_classes: int, bg_rate: float, seed: int, epoch: int) -> np.ndarray:
    """Shuffled patch indices of one epoch: all positives and a fresh ``bg_rate`` share of background."""
    rng = np.random.default_rng([seed, epoch])
    positives = np.flatnonzero(is_positive(labels, num_classes))
    background = np.flatnonzero(labels == num_classes)
    chosen = background[rng.random(len(background)) < bg_rate]
    return rng.permutation(np.concatenate([positives, chosen]))


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


class LRSchedule:
    """Step decays at fractions of the run, or division by 10 when the loss plateaus (at most ``max_decays``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: Recipe):
        self.optimizer, self.t = optimizer, recipe.train
        self.decays, self.best, self.bad_epochs = 0, math.inf, 0
        self.milestones = sorted({max(1, round(f * self.t.epochs)) for f in self.t.milestones})

    def stops(self, loss: float) -> bool:
        """Whether ``step`` with this epoch's ``loss`` will end the run (a plateau after the last decay)."""
        return (self.t.schedule == "plateau" and loss >= self.best * (1 - 1e-3)
                and self.bad_epochs + 1 > self.t.plateau_patience and self.decays >= self.t.max_decays)

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


@dataclass
class EpochSums:
    """This process's running sums of the current epoch (per rank under DDP)."""

    loss_sum: float = 0.0
    steps: int = 0
    correct: int = 0
    patches: int = 0

    def add(self, loss: float, correct: int, patches: int) -> "EpochSums":
        return EpochSums(self.loss_sum + loss, self.steps + 1, self.correct + correct, self.patches + patches)


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
    sums, the calibration and fusion of the last evaluation, and the RNG state.

    ``rng`` is the generators' state at the start of step ``step`` of epoch ``epoch``, so that a
    resumed epoch draws the same dropout masks as an uninterrupted one.
    """

    def __init__(self, head: AdaptationHead, recipe: Recipe, device: torch.device,
                 stages: UnlockedStages | None = None):
        self.head, self.stages, self.device = head, stages, device
        self.optimizer = make_optimizer(head, recipe, stages)
        self.schedule = LRSchedule(self.optimizer, recipe)
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.history: list[dict] = []
        self.sums = EpochSums()
        self.calibration: dict | None = None
        self.fusion: dict | None = None
        self.rng = _rng_state(device)

    def state_dict(self) -> dict:
        trunk = {} if self.stages is None else {"trunk": {k: v.cpu() for k, v in self.stages.state().items()}}
        fusion = {} if self.fusion is None else {"fusion": self.fusion}
        return {"head": self.head.state_dict(), **trunk, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_map07": self.best, "history": list(self.history), "carry": asdict(self.sums),
                "rng": dict(self.rng), "calibration": self.calibration, **fusion}

    def load_state_dict(self, state: dict, path: str | Path = "the checkpoint") -> None:
        load_head(self.head, state, path)
        if self.stages is not None:
            self.stages.load(state["trunk"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best_map07"]
        self.history, self.calibration = list(state["history"]), state.get("calibration")
        self.fusion = state.get("fusion")
        self.sums = EpochSums(**state["carry"])
        self.rng = dict(state["rng"])
        _set_rng_state(self.rng, self.device)


@dataclass
class EpochEnd:
    """What ``end_epoch`` works out before its commit: the epoch's history record, and what the evaluation on
    the selection images found (its AP table, the calibration and fusion fitted there, a new best)."""

    record: dict
    table: APTable | None = None
    calibration: dict | None = None
    fusion: dict | None = None
    improved: bool = False
    stop: bool = False


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_map07: float  # on the selection images (held-out training images or data.select_split)
    table: APTable | None  # last.pt on data.val_split, for reporting
    seconds: float


# --------------------------------------------------------------------------- end-of-epoch callbacks


class SelectionEval:
    """Before the commit: score the selection images, fit the calibration (and, with ``infer.fuse``, the fusion
    weight of the max-pool SVM, fitted once on the other training images) and say whether best.pt improved."""

    def __init__(self, recipe: Recipe, train_data: SplitData, selection: Selection):
        self.recipe, self.train_data, self.selection = recipe, train_data, selection
        self.svm: tuple | None = None

    def before_commit(self, trainer: "Trainer", end: EpochEnd) -> None:
        t, done, sel, head = self.recipe.train, end.record["epoch"], self.selection, trainer.state.head
        scored = done % t.eval_every == 0 or done == t.epochs
        # the last.pt of a run the plateau schedule stops gets its own fusion, evaluated or not
        if trainer.rank or not (scored or (end.stop and self.recipe.infer.fuse)):
            return
        if scored:
            end.table, scores = evaluate(head, sel.data.store, sel.data.dataset, sel.items, self.recipe.pool,
                                         self.recipe.infer_pool)
            end.record.update(select_map07=end.table.map07, select_map=end.table.map)
            end.improved = end.table.map07 > trainer.state.best
            end.calibration = _calibration(self.recipe, scores, sel.labels())
        else:
            scores = image_scores(head, sel.data.store, sel.items, self.recipe.pool, self.recipe.infer_pool)
        if self.recipe.infer.fuse:
            end.fusion, end.calibration = self._fuse(scores, trainer.state.stages is not None)

    def _fuse(self, scores: np.ndarray, unlocked: bool) -> tuple[dict, dict]:
        """The fusion of the head's selection ``scores`` with the max-pool SVM, and the calibration of the fused
        scores."""
        if self.svm is None or unlocked:  # unlocked stages change the features the SVM sees
            self.svm = self._fit_svm()
        coef, intercept, pooled = self.svm
        labels = self.selection.labels()
        fusion, tried = fit_fusion(self.recipe.infer_pool, coef, intercept, scores, pooled, labels)
        log.info("fusion: selection mAP by weight %s; chose %g",
                 ", ".join(f"{w:g}: {100 * m:.1f}" for w, m in tried.items()), fusion.weight)
        calibration = _calibration(self.recipe, fusion.combine(scores, fusion.decision(pooled)), labels, fused=True)
        return {**fusion.to_dict(), "k": self.recipe.pool.k}, calibration

    def _fit_svm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The max-pool linear SVM on the training items (never the selection images), and the selection
        images' max-pooled features."""
        data, sel = self.train_data, self.selection
        store = data.store
        items = np.flatnonzero(store.ok & ~held_out(data, sel))
        log.info("fusion: fitting the max-pool linear SVM on %d training items", len(items))
        pooled = pool_features(store.trunk_rows, store.offsets, items, "max")
        ids = [data.dataset.records[r].image_id for r in store.record[items]]
        model = fit_linear(SplitFeatures(ids, pooled, data.image_labels(items), data.dataset.classes),
                           seed=self.recipe.train.seed, progress=False)
        held = pool_features(sel.data.store.trunk_rows, sel.data.store.offsets, sel.items)
        return (*linear_arrays(model, pooled.shape[1]), held)


class Checkpoints:
    """At the commit: best.pt when the selection mAP improved (every epoch without selection images), last.pt
    always; both from the committed state and the run's ``meta``."""

    def __init__(self, run_dir: Path, meta: dict, has_selection: bool):
        self.best, self.last, self.meta, self.has_selection = run_dir / "best.pt", run_dir / "last.pt", meta, has_selection

    def save(self, trainer: "Trainer", path: Path) -> None:
        if trainer.rank == 0:
            save_checkpoint({**trainer.state.state_dict(), **self.meta}, path)

    def at_commit(self, trainer: "Trainer", end: EpochEnd) -> None:
        if end.improved or (not self.has_selection and trainer.rank == 0):
            self.save(trainer, self.best)  # without selection images, the last head is the best we know
        self.save(trainer, self.last)


class TrainingLog:
    """After the commit: the epoch's log line, and TensorBoard scalars and heatmaps (rank 0)."""

    def __init__(self, recipe: Recipe, selection: Selection | None):
        from torch.utils.tensorboard import SummaryWriter

        self.recipe, self.selection = recipe, selection
        self.writer = SummaryWriter(str(recipe.run_dir / "tensorboard"))

    def after_commit(self, trainer: "Trainer", end: EpochEnd) -> None:
        record, table, e = end.record, end.table, end.record["epoch"]
        for key in ("loss", "patch_acc", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], e)
        if table is not None:
            self.writer.add_scalar("select/mAP_11pt", table.map07, e)
            self.writer.add_scalar("select/mAP_envelope", table.map, e)
            if self.recipe.runtime.heatmaps and self.selection is not None:
                from .heatmaps import log_heatmaps  # matplotlib: only when heatmaps are logged

                log_heatmaps(self.writer, trainer.state.head, self.selection.data, self.recipe, e, self.selection.items)
        self.writer.flush()
        sel = (f", selection mAP {100 * record['select_map07']:.1f} (11-pt) {100 * record['select_map']:.1f} (env)"
               if "select_map07" in record else "")
        what = "patch accuracy" if self.recipe.train.supervision != "images" else "-"
        log.info("epoch %d: loss %.4f, %s %.3f, lr %.3g%s (%.0f s)", e, record["loss"], what, record["patch_acc"],
                 record["lr"], sel, record["seconds"])

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs the epochs of one recipe on prepared splits (see the module docstring)."""

    def __init__(self, recipe: Recipe, train_data: SplitData, selection: Selection | None, state: TrainState,
                 meta: dict, progress: bool = True):
        self.recipe, self.t, self.data, self.selection, self.state = recipe, recipe.train, train_data, selection, state
        self.progress = progress
        self.rank, self.world = rank_world()
        self.num_classes = len(train_data.dataset.classes)
        net = state.head if state.stages is None else MapsAndHead(state.stages, state.head)
        self.model = torch.nn.parallel.DistributedDataParallel(net) if self.world > 1 else net
        held = held_out(train_data, selection)
        self.train_items = np.flatnonzero(train_data.store.ok & ~held)
        # held-out images, and their augmented views, never train
        self.labels = np.where(np.repeat(held, np.diff(train_data.store.offsets)), IGNORE, train_data.labels)
        self.epoch_seconds = 0.0  # of the last run_epoch (0 when resuming at end_epoch)
        self.dtype = autocast_dtype(self.t.precision, state.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.checkpoints = Checkpoints(recipe.run_dir, meta, selection is not None)
        self.callbacks: list = [SelectionEval(recipe, train_data, selection)] if selection is not None else []
        self.callbacks.append(self.checkpoints)

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
            self._commit_step(loss, correct, patches)
            seen += n
            bar.update(1)
            bar.set_postfix(loss=f"{s.sums.loss_sum / s.sums.steps:.4f}",
                            patches_s=f"{seen / max(time.perf_counter() - tick, 1e-9):.0f}", refresh=False)
        bar.close()
        self.epoch_seconds = time.perf_counter() - tick

    def _commit_step(self, loss: torch.Tensor, correct: int, patches: int) -> None:
        s = self.state
        with hold_interrupts():  # the update and the step counter move together
            s.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(s.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                s.optimizer.step()
            s.sums = s.sums.add(loss.item(), correct, patches)
            s.step, s.rng = s.step + 1, _rng_state(s.device)

    def end_epoch(self) -> bool:
        """Evaluate, step the schedule, log and checkpoint; False when the plateau schedule stops the run.

        Everything is computed first and committed at the end, so an interrupt before the commit
        leaves the state at "all steps of epoch E done": resume re-runs exactly this method.
        """
        s = self.state
        sums = all_sum(torch.tensor([s.sums.loss_sum, s.sums.steps, s.sums.correct, s.sums.patches],
                                    dtype=torch.float64))
        loss, acc = (sums[0] / max(sums[1], 1)).item(), (sums[2] / max(sums[3], 1)).item()
        end = EpochEnd({"epoch": s.epoch + 1, "loss": loss, "patch_acc": acc, "lr": s.optimizer.param_groups[0]["lr"],
                        "seconds": round(self.epoch_seconds, 3)}, calibration=s.calibration, fusion=s.fusion,
                       stop=s.schedule.stops(loss))
        for callback in self.callbacks:
            getattr(callback, "before_commit", _nothing)(self, end)
        with hold_interrupts():  # commit
            keep_going = s.schedule.step(s.epoch + 1, loss)
            s.history.append(end.record)
            s.epoch, s.step, s.sums, s.calibration, s.fusion = s.epoch + 1, 0, EpochSums(), end.calibration, end.fusion
            if end.improved:
                s.best = end.table.map07
            for callback in self.callbacks:
                getattr(callback, "at_commit", _nothing)(self, end)
        for callback in self.callbacks:
            getattr(callback, "after_commit", _nothing)(self, end)
        return keep_going

    def fit(self) -> None:
        s = self.state
        if self.rank == 0:
            self.callbacks.append(TrainingLog(self.recipe, self.selection))
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
                    _sums_path(self.recipe.run_dir, self.rank).write_text(json.dumps(asdict(s.sums)))
                self.checkpoints.save(self, self.checkpoints.last)
            log.warning("interrupted: saved %s at epoch %d, step %d; continue with --resume", self.checkpoints.last,
                        s.epoch + 1, s.step)
            raise
        finally:
            for callback in self.callbacks:
                getattr(callback, "close", lambda: None)()

    # ------------------------------------------------------------------ steps
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in fp32; the head's matrix products run under autocast (``train.precision``)."""
        device = self.state.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(x.to(device)).float()

    def _patch_loss(self, logits: torch.Tensor, labels: np.ndarray, index: np.ndarray) -> torch.Tensor:
        targets = (patch_targets(labels, index, self.data.multi_rows, self.data.multi_targets, self.num_classes)
                   if self.t.multilabel else None)
        return patch_loss(logits, labels, targets)

    def _patch_step(self, idx: np.ndarray):
        x = torch.from_numpy(self.data.store.rows[idx])
        labels = self.labels[idx]
        logits = self._forward(x)
        loss = self._patch_loss(logits, labels, idx)
        self._check(loss, x, labels)
        return (loss, *accuracy_counts(logits, labels), len(idx))

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
            correct, patches = accuracy_counts(logits[rows], labels[train])
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
            f"{self.checkpoints.last} is left as it was; lower train.lr, or check the feature cache "
            f"(patchnet cache verify --cache-dir {Path(self.recipe.runtime.cache_dir)}).")


def _nothing(*_args) -> None:
    """A callback's missing step."""


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


def _sums_path(run_dir: Path, rank: int) -> Path:
    """Under DDP an interrupted rank keeps its own running sums here (rank 0's are in last.pt)."""
    return run_dir / f"carry.rank{rank}.json"


# --------------------------------------------------------------------------- a run


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the adaptation head of ``recipe``; checkpoints go to ``recipe.run_dir``."""
    init_distributed()
    rank, _ = rank_world()
    started = time.perf_counter()
    saved = _saved_run(recipe) if resume else None
    if rank == 0:
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, recipe.run_dir / "recipe.yaml")
    backbone = None
    if recipe.train.unlock:  # the trunk whose last stages train; the extractor runs a fused copy of its frozen part
        b = recipe.backbone
        backbone = build_backbone(b.name, b.weights, b.input_size, b.layer)
    extractor = build_extractor(recipe) if backbone is None else build_extractor(recipe, backbone)
    # a resumed run keeps the projection its head was trained on; unlock stores its maps as they are
    codec = FeatureCodec.from_state(saved.get("codec")) if saved is not None else None
    train_set = open_split(recipe.data, recipe.data.train_split)
    spec = cache_spec(recipe, extractor, train_set, FeatureCodec() if recipe.train.unlock else codec, progress)
    train_data = prepare_split(recipe, recipe.data.train_split, extractor, spec, views=recipe.aug.views,
                               progress=progress, dataset=train_set)
    classes = train_data.dataset.classes
    selection = selection_split(recipe, train_data, extractor, spec, progress)
    log_split("train", train_data, selection)
    val = (prepare_split(recipe, recipe.data.val_split, extractor, spec, progress=progress, classes=classes)
           if recipe.data.val_split else None)
    torch.manual_seed(recipe.train.seed)
    device = extractor.device
    head = AdaptationHead(train_data.store.feature_dim, len(classes), recipe.head.hidden, recipe.head.dropout).to(device)
    stages = _unlocked_stages(recipe, backbone, device, [train_data, selection.data if selection else None, val])
    state = TrainState(head, recipe, device, stages)
    # feature_dim: the trunk's; the head reads codec.dim(feature_dim) values, the codec's projection applied
    meta = {"recipe": recipe.to_dict(), "classes": classes, "feature_dim": extractor.feature_dim,
            "weights_id": extractor.backbone.weights_id, "codec": spec.codec.state_dict()}
    if saved is not None:
        check_compatible(saved, recipe.run_dir / "last.pt", recipe.backbone.name, classes, extractor.feature_dim,
                         extractor.backbone.weights_id)
        state.load_state_dict(saved, recipe.run_dir / "last.pt")
        if rank:
            sums = _sums_path(recipe.run_dir, rank)
            state.sums = EpochSums(**json.loads(sums.read_text())) if sums.is_file() else EpochSums()
        log.info("resuming %s at epoch %d, step %d", recipe.run_dir, state.epoch + 1, state.step)
    Trainer(recipe, train_data, selection, state, meta, progress).fit()
    if rank:
        _sums_path(recipe.run_dir, rank).unlink(missing_ok=True)
    table = _report(recipe, state, val) if val is not None and rank == 0 else None
    return TrainResult(recipe.run_dir, state.epoch, state.best, table, time.perf_counter() - started)


def _saved_run(recipe: Recipe) -> dict:
    """last.pt of the run to resume, checked to come from the same recipe."""
    last_path = recipe.run_dir / "last.pt"
    if not last_path.is_file():
        raise CheckpointError(f"--resume: {last_path} does not exist; start without --resume")
    saved = load_checkpoint(last_path)
    if _resume_key(recipe_from_dict(saved["recipe"]).to_dict()) != _resume_key(recipe.to_dict()):
        raise CheckpointError(f"--resume: {last_path} was made with another recipe; resume with the saved one: "
                              f"patchnet train --recipe {recipe.run_dir / 'recipe.yaml'} --resume")
    return saved


def _unlocked_stages(recipe: Recipe, backbone, device: torch.device, splits: list) -> UnlockedStages | None:
    """With ``train.unlock``: the stages that train, with every split's map store reading through them."""
    if backbone is None:
        return None
    stages = UnlockedStages(backbone, unlock_split(backbone_spec(backbone.name), recipe.train.unlock)).to(
        device, memory_format=torch.channels_last if recipe.backbone.channels_last else torch.contiguous_format)
    for data in splits:
        if data is not None:  # their features come from the stages as they are when read
            data.store.attach(stages, autocast_dtype(recipe.train.precision, device))
    return stages


def _report(recipe: Recipe, state: TrainState, val: SplitData) -> APTable:
    """last.pt on the validation split (with its fusion): reported, never used to choose."""
    fusion = Fusion.from_dict(state.fusion) if state.fusion is not None else None
    table, _ = evaluate(state.head, val.store, val.dataset, evaluation_items(val.store), recipe.pool,
                        recipe.infer_pool, fusion)
    log.info("last.pt on %s: mAP %.1f (11-pt) %.1f (envelope)", recipe.data.val_split, 100 * table.map07,
             100 * table.map)
    return table


def _calibration(recipe: Recipe, scores: np.ndarray, labels: np.ndarray, fused: bool = False) -> dict:
    """The checkpoint entry of a calibration of held-out scores, with the power it holds for."""
    out = calibrate(scores, labels, recipe.infer_pool, fused).to_dict()
    if recipe.infer_pool == "power":
        out["k"] = recipe.pool.k
    return out


def _resume_key(values: dict) -> dict:
    """What a resumed run must share with the saved one: all but the runtime section and train.epochs
    (a finished run may be extended)."""
    return {**{k: v for k, v in values.items() if k != "runtime"},
            "train": {k: v for k, v in values["train"].items() if k != "epochs"}}
