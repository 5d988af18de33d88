"""What happens at the end of each training epoch, around its commit (``Trainer.end_epoch``): the evaluation on the
selection images with the calibration and the fusion fitted there (before the commit), the checkpoints (at the
commit), the logs (after it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import calibrate
from .dist import rank_world
from .fusion import fit_fusion
from .linear import SplitFeatures, fit_linear, linear_arrays
from .metrics import APTable
from .model import save_checkpoint
from .pooling import pool_features
from .recipe import Recipe
from .scoring import evaluate, image_scores
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


class SelectionEval:
    """Before the commit: score the selection images, fit the calibration (and, with ``infer.fuse``, the fusion
    weight of the max-pool SVM, fitted once on the other training images) and say whether best.pt improved."""

    def __init__(self, recipe: Recipe, train_data: SplitData, selection: Selection):
        self.recipe, self.train_data, self.selection = recipe, train_data, selection
        self.rank = rank_world()[0]
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


class Checkpoints:
    """At the commit: best.pt when the selection mAP improved (every epoch without selection images), last.pt
    always; both from the committed state and the run's ``meta``."""

    def __init__(self, run_dir: Path, meta: dict, has_selection: bool):
        self.best, self.last, self.meta, self.has_selection = (
            run_dir / "best.pt",
            run_dir / "last.pt",
            meta,
            has_selection,
        )
        self.rank = rank_world()[0]

    def save(self, state: TrainState, path: Path) -> None:
        if self.rank == 0:
            save_checkpoint({**state.state_dict(), **self.meta}, path)

    def at_commit(self, state: TrainState, end: EpochEnd) -> None:
        if end.improved or not self.has_selection:
            self.save(state, self.best)  # without selection images, the last head is the best we know
        self.save(state, self.last)


class TrainingLog:
    """After the commit: the epoch's log line, and TensorBoard scalars and heatmaps (rank 0)."""

    def __init__(self, recipe: Recipe, selection: Selection | None):
        from torch.utils.tensorboard import SummaryWriter

        self.recipe, self.selection = recipe, selection
        self.writer = SummaryWriter(str(recipe.run_dir / "tensorboard"))

    def after_commit(self, state: TrainState, end: EpochEnd) -> None:
        record, table, e = end.record, end.table, end.record["epoch"]
        for key in ("loss", "patch_acc", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], e)
        if table is not None:
            self.writer.add_scalar("select/mAP_11pt", table.map07, e)
            self.writer.add_scalar("select/mAP_envelope", table.map, e)
            if self.recipe.runtime.heatmaps and self.selection is not None:
                from .heatmaps import log_heatmaps  # matplotlib: only when heatmaps are logged

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

    def close(self) -> None:
        self.writer.close()


def _calibration(
    recipe: Recipe, scores: np.ndarray, labels: np.ndarray, fused: bool = False, shared: bool = False
) -> dict:
    """The checkpoint entry of a calibration of held-out scores, with the power it holds for."""
    out = calibrate(scores, labels, recipe.infer_pool, fused, shared).to_dict()
    if recipe.infer_pool == "power":
        out["k"] = recipe.pool.k
    return out
