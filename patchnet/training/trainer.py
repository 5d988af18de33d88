"""The training loop on cached trunk features: patch loss (boxes), image loss (images), or both.

- ``boxes``: batches of patches; every positive and a fresh ``bg_rate`` share of background each
  epoch, softmax cross-entropy over the classes and background (the paper).
- ``images``: batches of whole images; each class's patch evidence is pooled into an image logit
  (``patchnet.head.pooling``) and meets the image labels in a binary cross-entropy (label 0 left out).
- ``both``: batches of whole images, the image loss plus the patch loss on their positives and a
  ``bg_rate`` share of their background, from one forward pass.

With ``train.image_patches`` < 1 the image loss pools over a fresh random share of each image's patches
each epoch, and only those (and the patch loss's patches) go through the head: the step's cost follows.

With ``train.unlock`` the trunk's last stages train too (``patchnet.training.unlock``): every supervision
steps on batches of whole images, whose cached maps run through the unlocked stages first.

One ``TrainState`` owns everything that a resumed run must get back. ``Trainer.run_epoch`` does the
steps; ``Trainer.end_epoch`` runs the hooks (``patchnet.training.hooks``: the evaluation on held-out training
images with its calibration and fusion, the checkpoints, the logs) around one commit, so that
``last.pt`` is only written from a consistent state. Epoch e draws its order and its background from
a generator seeded by ``(seed, e)``, so a killed epoch replays exactly on resume.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import backbone_spec, build_backbone, unlock_split
from ..checkpoint import Checkpoint, run_folder
from ..data import Dataset
from ..dist import all_sum, init_distributed, is_main, rank_world, resolve_precision
from ..errors import PatchnetError
from ..evaluation.metrics import APTable, confusion_matrix
from ..evaluation.scoring import evaluate, evaluation_items
from ..features.extract import build_extractor
from ..files import atomic_write
from ..head.fusion import Fusion
from ..head.layers import AdaptationHead, mean_softmax_logits
from ..head.losses import accuracy_counts, image_loss, is_positive, patch_loss, patch_targets, sum_members
from ..head.pooling import gather_items, patch_values, pool, pooled_share
from ..patches.labels import IGNORE
from ..recipe import Recipe, save_recipe
from ..store import FeatureStore
from ..threads import tick
from .detector import add_detector
from .hooks import Checkpoints, EpochEnd, HookBase, SelectionEval, TrainingLog, check_hooks
from .splits import Selection, SplitData, held_out, run_splits
from .state import EpochSums, TrainState, hold_interrupts, resume_run, rng_state, saved_run, sums_path
from .unlock import MapsAndHead, MapStore, UnlockedStages

log = logging.getLogger("patchnet")

__all__ = ["Trainer", "TrainingError", "epoch_indices", "train"]


class TrainingError(PatchnetError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


def epoch_indices(labels: np.ndarray, num_classes: int, bg_rate: float, seed: int, epoch: int) -> np.ndarray:
    """Shuffled patch indices of one epoch: all positives and a fresh ``bg_rate`` share of background."""
    rng = np.random.default_rng([seed, epoch])
    positives = np.flatnonzero(is_positive(labels, num_classes))
    background = np.flatnonzero(labels == num_classes)
    chosen = background[rng.random(len(background)) < bg_rate]
    return rng.permutation(np.concatenate([positives, chosen]))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype (``train.precision``); fp16 only on CUDA, where gradients are loss-scaled."""
    dtype = resolve_precision(precision, device)
    return torch.bfloat16 if dtype == torch.float16 and device.type != "cuda" else dtype


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_map07: float  # on the selection images (held-out training images or data.select_split)
    table: APTable | None  # last.pt on data.val_split, for reporting
    seconds: float
    confusion: np.ndarray | None = None  # (C, C) of last.pt on data.val_split where it is single-label

    @property
    def best(self) -> Path:  # last.pt for a run with nothing to choose best.pt on
        return self.run_dir / "best.pt" if (self.run_dir / "best.pt").is_file() else self.last

    last = property(lambda self: self.run_dir / "last.pt")


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs the epochs of one recipe on prepared splits (see the module docstring)."""

    def __init__(
        self,
        recipe: Recipe,
        train_data: SplitData,
        selection: Selection | None,
        state: TrainState,
        facts: Checkpoint,
        progress: bool = True,
        hooks: Sequence[HookBase] = (),
    ):
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
        self.patch_draw: np.ndarray | None = None  # per row, this epoch's draw for train.image_patches
        self.dtype = autocast_dtype(self.t.precision, state.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.checkpoints = Checkpoints(recipe.run_dir, facts, selection is not None)
        own: list[HookBase] = [SelectionEval(recipe, train_data, selection)] if selection is not None else []
        own += [self.checkpoints, *([TrainingLog(recipe, selection)] if self.rank == 0 else [])]
        self.hooks = [*own, *check_hooks(hooks)]  # the user's after patchnet's own: they see the evaluation's

    # ------------------------------------------------------------------ the two halves of an epoch
    def run_epoch(self) -> None:
        """The remaining steps of the current epoch; the state stays consistent after every step."""
        s, t = self.state, self.t
        images = t.supervision != "boxes" or s.stages is not None  # batches of whole images
        order = (
            np.random.default_rng([t.seed, s.epoch]).permutation(self.train_items)
            if images
            else epoch_indices(self.labels, self.num_classes, t.bg_rate, t.seed, s.epoch)
        )
        per_rank = max(1, (t.image_batch if images else t.batch_size) // (1 if images else self.world))
        # whole batches only, so that one process and several see the same global batches
        steps = max(1, len(order) // (per_rank * self.world))
        order = order[self.rank :: self.world]
        keep_bg = (
            np.random.default_rng([t.seed, s.epoch, 1]).random(len(self.labels)) < t.bg_rate
            if images and t.supervision != "images"
            else None
        )
        # train.image_patches < 1: the image loss pools over a fresh random share of each image's patches
        self.patch_draw = (
            np.random.default_rng([t.seed, s.epoch, 2]).random(len(self.labels))
            if t.supervision != "boxes" and t.image_patches < 1
            else None
        )
        s.head.train()
        bar = tqdm(
            total=steps,
            initial=s.step,
            desc=f"epoch {s.epoch + 1}/{t.epochs}",
            unit="batch",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
            leave=False,
        )
        started, seen = time.perf_counter(), 0
        while s.step < steps:
            tick()  # another process may have started: spinning threads give way (threads.py)
            batch = np.sort(order[s.step * per_rank : (s.step + 1) * per_rank])
            loss, correct, patches, n = self._image_step(batch, keep_bg) if images else self._patch_step(batch)
            self._commit_step(loss, correct, patches)
            for hook in self.hooks:
                hook.after_step(s)
            seen += n
            bar.update(1)
            bar.set_postfix(
                loss=f"{s.sums.loss_sum / s.sums.steps:.4f}",
                patches_s=f"{seen / max(time.perf_counter() - started, 1e-9):.0f}",
                refresh=False,
            )
        bar.close()
        self.epoch_seconds = time.perf_counter() - started

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
            s.sums = s.sums.add(loss.item() / s.head.members, correct, patches)  # the loss of one member
            s.step, s.rng = s.step + 1, rng_state(s.device)

    def end_epoch(self) -> bool:
        """Evaluate, step the schedule, log and checkpoint; False when the plateau schedule stops the run.

        Everything is computed first and committed at the end, so an interrupt before the commit
        leaves the state at "all steps of epoch E done": resume re-runs exactly this method.
        """
        s = self.state
        sums = all_sum(
            torch.tensor([s.sums.loss_sum, s.sums.steps, s.sums.correct, s.sums.patches], dtype=torch.float64)
        )
        # typeshed's max has no common type for a Tensor and an int
        loss, acc = (sums[0] / max(sums[1], 1)).item(), (sums[2] / max(sums[3], 1)).item()  # type: ignore[operator]
        end = EpochEnd(
            {
                "epoch": s.epoch + 1,
                "loss": loss,
                "patch_acc": acc,
                "lr": s.optimizer.param_groups[0]["lr"],
                "seconds": round(self.epoch_seconds, 3),
            },
            calibration=s.calibration,
            fusion=s.fusion,
            stop=s.schedule.stops(loss),
        )
        for hook in self.hooks:
            hook.before_commit(s, end)
        with hold_interrupts():  # commit
            keep_going = s.schedule.step(s.epoch + 1, loss)
            s.history.append(end.record)
            s.epoch, s.step, s.sums, s.calibration, s.fusion = s.epoch + 1, 0, EpochSums(), end.calibration, end.fusion
            if end.improved:
                assert end.table is not None  # an improvement was measured on it (SelectionEval)
                s.best = end.table.map07
            for hook in self.hooks:
                hook.at_commit(s, end)
        for hook in self.hooks:
            hook.after_epoch(s, end)
        return keep_going

    def fit(self) -> None:
        s = self.state
        try:
            for hook in self.hooks:
                hook.before_train(s)
            while s.epoch < self.t.epochs:
                self.run_epoch()
                if not self.end_epoch():
                    log.info(
                        "loss plateaued after %d learning-rate decays: stopping at epoch %d", s.schedule.decays, s.epoch
                    )
                    break
        except KeyboardInterrupt:
            # every step and end_epoch commit leaves the state consistent; no collective calls here
            with hold_interrupts():  # a second Ctrl-C must not cut the save short
                if self.rank:
                    atomic_write(sums_path(self.recipe.run_dir, self.rank), json.dumps(asdict(s.sums)))
                self.checkpoints.save(s, self.checkpoints.last)
            log.warning(
                "interrupted: saved %s at epoch %d, step %d; continue with --resume",
                self.checkpoints.last,
                s.epoch + 1,
                s.step,
            )
            raise
        finally:
            for hook in self.hooks:
                hook.after_train(s)

    # ------------------------------------------------------------------ steps
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(members, N, C + 1) fp32 logits; the head's matrix products run under autocast (``train.precision``)."""
        device = self.state.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(x.to(device), members=True).float()

    def _patch_loss(self, logits: torch.Tensor, labels: np.ndarray, index: np.ndarray) -> torch.Tensor:
        targets = (
            patch_targets(labels, index, self.data.multi_rows, self.data.multi_targets, self.num_classes)
            if self.t.multilabel
            else None
        )
        return patch_loss(logits, labels, targets)

    def _patch_step(self, idx: np.ndarray):
        x = torch.from_numpy(cast(FeatureStore, self.data.store).rows[idx])  # patch batches: no unlocked stages
        labels = self.labels[idx]
        logits = self._forward(x)
        loss = sum_members(self._patch_loss(z, labels, idx) for z in logits)  # each member trains on its own loss
        self._check(loss, x, labels)
        return (loss, *accuracy_counts(mean_softmax_logits(logits), labels), len(idx))

    def _image_step(self, items: np.ndarray, keep_bg: np.ndarray | None):
        """A step on whole images: the image loss (images, both), the patch loss (both; boxes with unlock)."""
        store, sup = self.data.store, self.t.supervision
        counts = np.diff(store.offsets)[items]
        index = np.concatenate([np.arange(store.offsets[i], store.offsets[i + 1]) for i in items])
        labels = self.labels[index]
        train = (
            is_positive(labels, self.num_classes) | ((labels == self.num_classes) & cast(np.ndarray, keep_bg)[index])
            if sup != "images"
            else None
        )
        pooled = self._image_rows(index, counts)  # the rows the image loss pools over (None: all)
        # the rows that go through the head (None: all)
        if sup == "boxes":  # here only with unlocked stages: the patch loss's rows alone
            forward = train
        elif pooled is None or train is None:
            forward = pooled
        else:  # both, on a share: the pooled rows and the patch loss's
            forward = pooled | train
        if self.state.stages is None:
            features = cast(FeatureStore, store).rows  # a MapStore comes only with unlocked stages
            x = torch.from_numpy(
                gather_items(features, store.offsets, items) if forward is None else features[index[forward]]
            )
            logits = self._forward(x)
        else:
            x, logits = self._forward_maps(items, counts, forward)
        if forward is not None:  # from here on, positions among the forwarded rows
            if pooled is not None:
                counts = np.bincount(np.repeat(np.arange(len(counts)), counts)[pooled], minlength=len(counts))
                pooled = pooled[forward]
            train = None if train is None else train[forward]
            index, labels = index[forward], labels[forward]
        loss, correct, patches = None, 0, 0
        if sup != "boxes":
            rows = logits if pooled is None else logits[:, torch.from_numpy(pooled)]
            # alone, the image loss sums over classes (lr 0.01 as for the patch loss); beside the patch loss it
            # averages (the summed term at image_weight 1 scored 91.3 against 91.6 on held-out devtrain)
            y, cfg = torch.from_numpy(self.data.image_labels(items)).to(logits.device), self.recipe.pool
            reduction = "sum" if sup == "images" else "mean"
            loss = sum_members(image_loss(pool(patch_values(z, cfg.name), counts, cfg), y, reduction) for z in rows)
            if sup == "both":
                loss = self.t.image_weight * loss
        if train is not None and train.any():  # train is None exactly when sup == "images"
            picked = torch.from_numpy(np.flatnonzero(train)).to(logits.device)
            patch = sum_members(self._patch_loss(z[picked], labels[train], index[train]) for z in logits)
            loss = patch if loss is None else loss + patch
            correct, patches = accuracy_counts(mean_softmax_logits(logits[:, picked]), labels[train])
        if loss is None:  # no patch of these images trains (boxes): a step without a gradient
            loss = logits.sum() * 0.0
        self._check(loss, x, None)
        return loss, correct, patches, len(x)

    def _image_rows(self, index: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """With ``train.image_patches`` < 1, this epoch's rows of ``index`` that the image loss pools over."""
        return None if self.patch_draw is None else pooled_share(self.patch_draw[index], counts, self.t.image_patches)

    def _forward_maps(self, items: np.ndarray, counts: np.ndarray, rows: np.ndarray | None):
        """Features and (1, N, C + 1) fp32 logits of the patches of ``items`` (those where ``rows`` is set, if
        given) through the unlocked stages and the head, under autocast (``train.precision``)."""
        maps = [cast(MapStore, self.data.store).item_maps(i) for i in items]  # the unlocked stages read maps
        if rows is not None:
            ends = np.cumsum(counts)
            maps = [m.subset(np.flatnonzero(rows[e - n : e])) for m, n, e in zip(maps, counts, ends)]
        device = self.state.device
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            x, logits = self.model(maps)
        return x.detach().float(), logits.float()[None]  # one member: unlocked stages train one head

    def _check(self, loss: torch.Tensor, x: torch.Tensor, labels: np.ndarray | None) -> None:
        if torch.isfinite(loss):
            return
        s = self.state
        counts = (
            f"; labels {np.bincount(labels[labels >= 0], minlength=self.num_classes + 1).tolist()}"
            if labels is not None
            else ""
        )
        raise TrainingError(
            f"loss became {loss.item()} at epoch {s.epoch + 1}, step {s.step + 1} "
            f"(lr {s.optimizer.param_groups[0]['lr']:.3g}); last batch: features mean {x.mean():.3g}, "
            f"std {x.std():.3g}, max |x| {x.abs().max():.3g}, any non-finite: {not torch.isfinite(x).all()}{counts}. "
            f"{self.checkpoints.last} is left as it was; lower train.lr, or check the feature cache "
            f"(patchnet cache verify --cache-dir {Path(self.recipe.runtime.cache_dir)})."
        )


# --------------------------------------------------------------------------- a run


def train(
    recipe: Recipe,
    resume: bool = False,
    progress: bool = True,
    datasets: dict[str, Dataset] | None = None,
    overwrite: bool = False,
    hooks: Sequence[HookBase] = (),
) -> TrainResult:
    """Train the adaptation head of ``recipe``; checkpoints go to ``recipe.run_dir``, which no other run may use
    meanwhile (its lock); ``overwrite`` clears an earlier run's files there first.

    ``datasets``: splits already read (split name -> dataset), not read again. ``hooks``: ``HookBase``
    objects called around the steps and epochs, after patchnet's own.
    """
    hooks = check_hooks(hooks)
    init_distributed()
    rank, _ = rank_world()
    started = time.perf_counter()
    recipe.check_run_dir()
    with run_folder(recipe.run_dir, overwrite and not resume, lock=rank == 0):
        saved = saved_run(recipe) if resume else None
        if rank == 0:
            recipe.run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, recipe.run_dir / "recipe.yaml")
            for warning in recipe.underfit_warnings():
                log.warning(warning)
        state, val = _run(recipe, saved, progress, datasets or {}, hooks)
        if rank:
            sums_path(recipe.run_dir, rank).unlink(missing_ok=True)
    table, confusion = _report(recipe, state, val) if val is not None and rank == 0 else (None, None)
    return TrainResult(recipe.run_dir, state.epoch, state.best, table, time.perf_counter() - started, confusion)


def _run(
    recipe: Recipe, saved: Checkpoint | None, progress: bool, datasets: dict[str, Dataset], hooks: Sequence[HookBase]
) -> tuple[TrainState, SplitData | None]:
    """The run itself, in its locked folder: the splits and their cache, the head, the epochs."""
    backbone = None
    if recipe.train.unlock:  # the trunk whose last stages train; the extractor runs a fused copy of its frozen part
        b = recipe.backbone
        backbone = build_backbone(b.name, b.weights, b.input_size, b.layer)
    extractor = build_extractor(recipe) if backbone is None else build_extractor(recipe, backbone)
    train_data, selection, val, spec, data = run_splits(recipe, extractor, saved, progress, datasets)
    classes = train_data.dataset.classes
    if is_main() and recipe.data.classes != classes:  # the saved recipe names the classes really used
        recipe.data.classes = list(classes)
        save_recipe(recipe, recipe.run_dir / "recipe.yaml")
    torch.manual_seed(recipe.train.seed)
    device = extractor.device
    head = AdaptationHead(train_data.store.feature_dim, len(classes), **asdict(recipe.head))
    stages = _unlocked_stages(recipe, backbone, device, [train_data, selection.data if selection else None, val])
    state = TrainState(head.to(device), recipe, device, stages)
    # feature_dim: the trunk's; the head reads codec.dim(feature_dim) values, the codec's projection applied
    facts = Checkpoint(
        head={},  # each save takes the state's
        recipe=recipe.to_dict(),
        classes=list(classes),
        feature_dim=extractor.feature_dim,
        weights_id=extractor.backbone.weights_id,
        codec=spec.codec.state_dict(),
        int8=extractor.int8_ranges,  # backbone.precision=int8: the activation ranges the features were made with
        data=data,
    )
    if saved is not None:
        resume_run(state, saved, recipe, extractor, classes)
        log.info("resuming %s at epoch %d, step %d", recipe.run_dir, state.epoch + 1, state.step)
    Trainer(recipe, train_data, selection, state, facts, progress, hooks).fit()
    if recipe.train.detector == "mil":
        add_detector(recipe, state.head, extractor, spec, train_data, selection, progress)
    return state, val


def _unlocked_stages(recipe: Recipe, backbone, device: torch.device, splits: list) -> UnlockedStages | None:
    """With ``train.unlock``: the stages that train, with every split's map store reading through them."""
    if backbone is None:
        return None
    stages = UnlockedStages(backbone, unlock_split(backbone_spec(backbone.name), recipe.train.unlock)).to(
        device,  # type: ignore[call-overload]  # torch's stub: Module.to takes memory_format with a device
        memory_format=torch.channels_last if recipe.backbone.channels_last else torch.contiguous_format,
    )
    for data in splits:
        if data is not None:  # their features come from the stages as they are when read
            data.store.attach(stages, autocast_dtype(recipe.train.precision, device))
    return stages


def _report(recipe: Recipe, state: TrainState, val: SplitData) -> tuple[APTable, np.ndarray | None]:
    """last.pt on the validation split (with its fusion), and its confusion matrix where the split is
    single-label: reported, never used to choose."""
    fusion = Fusion.from_dict(state.fusion) if state.fusion is not None else None
    items = evaluation_items(val.store)
    table, scores = evaluate(state.head, val.store, val.dataset, items, recipe.pool, recipe.infer_pool, fusion)
    log.info(
        "last.pt on %s: mAP %.1f (11-pt) %.1f (envelope)", recipe.data.val_split, 100 * table.map07, 100 * table.map
    )
    single = val.dataset.single_label and len(items)
    return table, confusion_matrix(scores, val.image_labels(items)) if single else None
