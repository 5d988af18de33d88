"""Hooks: objects the trainer calls around training, each step and each epoch's commit (``Trainer.end_epoch``).

patchnet's own: the evaluation on the selection images with the calibration and the fusion fitted there
(before the commit), the checkpoints (at the commit), the logs (after it). A user's hooks, subclasses of
``HookBase`` passed to ``patchnet.train(..., hooks=[...])``, run after them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, save_checkpoint
from ..dist import get_rank
from ..errors import PatchnetError
from ..evaluation.metrics import APTable
from ..evaluation.scoring import evaluate, image_scores
from ..head.calibration import calibrate
from ..head.fusion import fit_fusion
from ..head.pooling import pool_features
from ..recipe import Recipe
from ..studies.linear import SplitFeatures, fit_linear, linear_arrays
from .splits import Selection, SplitData, held_out
from .state import TrainState

log = logging.getLogger("patchnet")


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


class HookBase:
    """A training hook, as detectron2's: subclass it and override the methods you need (each does nothing here).

    - ``before_train(state)``: once, before the first step (of a resumed run too);
    - ``after_step(state)``: after each optimizer step, committed (``state.step`` counts it);
    - ``before_commit(state, end)``: at the end of an epoch, before its commit; ``end`` holds the epoch's
      history record (a hook may add values to ``end.record``: they are saved) and what the evaluation
      on the selection images found;
    - ``at_commit(state, end)``: inside the commit, the state at "epoch done";
    - ``after_epoch(state, end)``: after the commit;
    - ``after_train(state)``: once, when training ends, normally or not.
    """

    def before_train(self, state: TrainState) -> None:
        """Called once, before the first step."""

    def after_step(self, state: TrainState) -> None:
        """Called after each committed optimizer step."""

    def before_commit(self, state: TrainState, end: EpochEnd) -> None:
        """Called at the end of an epoch, before its commit."""

    def at_commit(self, state: TrainState, end: EpochEnd) -> None:
        """Called inside an epoch's commit."""

    def after_epoch(self, state: TrainState, end: EpochEnd) -> None:
        """Called after an epoch's commit."""

    def after_train(self, state: TrainState) -> None:
        """Called once when training ends (also on an error or an interrupt)."""


class HookError(PatchnetError, TypeError):
    """A hook passed to training that is not a ``HookBase``."""


def check_hooks(hooks: Sequence[HookBase]) -> list[HookBase]:
    """``hooks`` as a list, refused (before any work) where one is not a ``HookBase``."""
    for hook in hooks:
        if not isinstance(hook, HookBase):
            raise HookError(
                f"hooks: {hook!r} is not a patchnet.training.hooks.HookBase; subclass it and override its methods"
            )
    return list(hooks)


class SelectionEval(HookBase):
    """Before the commit: score the selection images, fit the calibration (and, with ``infer.fuse``, the fusion
    weight of the max-pool SVM, fitted once on the other training images) and say whether best.pt improved."""

    def __init__(self, recipe: Recipe, train_data: SplitData, selection: Selection):
        self.recipe, self.train_data, self.selection = recipe, train_data, selection
        self.rank = get_rank()
        self.svm: tuple | None = None
        # single-label data is read by its arg-max class: fusion and calibration keep the classes comparable
        self.single_label = train_data.dataset.single_label

    def before_commit(self, state: TrainState, end: EpochEnd) -> None:
        t, done, sel, head = self.recipe.train, end.record["epoch"], self.selection, state.head
        scored = done % t.eval_every == 0 or done == t.epochs
        # the last.pt of a run the plateau schedule stops gets its own fusion, evaluated or not
        if self.rank or not (scored or (end.stop and self.recipe.infer.fuse)):
            return
        if scored:
            end.table, scores = evaluate(
                head, sel.data.store, sel.data.dataset, sel.items, self.recipe.pool, self.recipe.infer_pool
            )
            end.record.update(select_map07=end.table.map07, select_map=end.table.map)
            end.improved = end.table.map07 > state.best
            end.calibration = _calibration(self.recipe, scores, sel.labels(), shared=self.single_label)
        else:
            scores = image_scores(head, sel.data.store, sel.items, self.recipe.pool, self.recipe.infer_pool)
        if self.recipe.infer.fuse:
            end.fusion, end.calibration = self._fuse(scores, state.stages is not None)

    def _fuse(self, scores: np.ndarray, unlocked: bool) -> tuple[dict, dict]:
        """The fusion of the head's selection ``scores`` with the max-pool SVM, and the calibration of the fused
        scores."""
        if self.svm is None or unlocked:  # unlocked stages change the features the SVM sees
            self.svm = self.fit_svm()
        coef, intercept, pooled = self.svm
        labels = self.selection.labels()
        weights, shared = self.recipe.infer.fuse_weights, self.single_label
        fusion, tried = fit_fusion(
            self.recipe.infer_pool, coef, intercept, scores, pooled, labels, weights, shared=shared
        )
        log.info(
            "fusion: selection mAP by weight %s; chose %s",
            ", ".join(f"{w:g}: {100 * m:.1f}" for w, m in tried.items()),
            fusion.weight_text(),
        )
        fused = fusion.combine(scores, fusion.decision(pooled))
        calibration = _calibration(self.recipe, fused, labels, fused=True, shared=self.single_label)
        return {**fusion.to_dict(), "k": self.recipe.pool.k}, calibration

    def fit_svm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The max-pool linear SVM on the training items (never the selection images), and the selection
        images' max-pooled features."""
        data, sel = self.train_data, self.selection
        store = data.store
        items = np.flatnonzero(store.ok & ~held_out(data, sel))
        log.info("fusion: fitting the max-pool linear SVM on %d training items", len(items))
        pooled = pool_features(store.trunk_rows, store.offsets, items, "max")
        ids = [data.dataset.records[r].image_id for r in store.record[items]]
        model = fit_linear(
            SplitFeatures(ids, pooled, data.image_labels(items), data.dataset.classes),
            seed=self.recipe.train.seed,
            progress=False,
        )
        held = pool_features(sel.data.store.trunk_rows, sel.data.store.offsets, sel.items)
        return (*linear_arrays(model, pooled.shape[1]), held)


class Checkpoints(HookBase):
    """At the commit: best.pt when the selection mAP improved (every epoch without selection images), last.pt
    always; both from the committed state and the run's ``facts`` (its recipe, classes, trunk, data)."""

    def __init__(self, run_dir: Path, facts: Checkpoint, has_selection: bool):
        self.best, self.last, self.facts, self.has_selection = (
            run_dir / "best.pt",
            run_dir / "last.pt",
            facts,
            has_selection,
        )
        self.rank = get_rank()

    def save(self, state: TrainState, path: Path) -> None:
        if self.rank == 0:
            save_checkpoint(state.checkpoint(self.facts), path)

    def at_commit(self, state: TrainState, end: EpochEnd) -> None:
        if end.improved or not self.has_selection:
            self.save(state, self.best)  # without selection images, the last head is the best we know
        self.save(state, self.last)


class TrainingLog(HookBase):
    """After the commit: the epoch's log line, and TensorBoard scalars and heatmaps (rank 0)."""

    def __init__(self, recipe: Recipe, selection: Selection | None):
        self.recipe, self.selection = recipe, selection
        self.writer: Any = None

    def before_train(self, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.recipe.run_dir / "tensorboard"))

    def after_epoch(self, state: TrainState, end: EpochEnd) -> None:
        record, table, e = end.record, end.table, end.record["epoch"]
        for key in ("loss", "patch_acc", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], e)
        if table is not None:
            self.writer.add_scalar("select/mAP_11pt", table.map07, e)
            self.writer.add_scalar("select/mAP_envelope", table.map, e)
            if self.recipe.runtime.heatmaps and self.selection is not None:
                from ..outputs.heatmaps import log_heatmaps  # matplotlib: only when heatmaps are logged

                log_heatmaps(self.writer, state.head, self.selection.data, self.recipe, e, self.selection.items)
        self.writer.flush()
        sel = (
            f", selection mAP {100 * record['select_map07']:.1f} (11-pt) {100 * record['select_map']:.1f} (env)"
            if "select_map07" in record
            else ""
        )
        # image labels alone train no patch: no patch accuracy to report
        acc = f", patch accuracy {record['patch_acc']:.3f}" if self.recipe.train.supervision != "images" else ""
        log.info(
            "epoch %d: loss %.4f%s, lr %.3g%s (%.0f s)", e, record["loss"], acc, record["lr"], sel, record["seconds"]
        )

    def after_train(self, state: TrainState) -> None:
        if self.writer is not None:
            self.writer.close()


def _calibration(
    recipe: Recipe, scores: np.ndarray, labels: np.ndarray, fused: bool = False, shared: bool = False
) -> dict:
    """The checkpoint entry of a calibration of held-out scores, with the power it holds for."""
    out = calibrate(scores, labels, recipe.infer_pool, fused, shared).to_dict()
    if recipe.infer_pool == "power":
        out["k"] = recipe.pool.k
    return out
