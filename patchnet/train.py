"""The training loop: cached trunk features -> adaptation head, with resampled background.

Epoch e trains on every positive patch and a fraction ``bg_rate`` of background patches drawn
from a generator seeded by ``(seed, e)``, so an epoch's batches can be replayed exactly on resume.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbones import build_backbone
from .cache import FeatureStore, build_features
from .datasets import Dataset, open_split
from .extract import PatchExtractor
from .heatmaps import log_heatmaps
from .infer import score_store
from .metrics import APTable, ap_table
from .model import AdaptationHead, CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from .recipe import Recipe, save_recipe
from .sampler import IGNORE, label_patches

log = logging.getLogger("patchnet")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class SplitData:
    """A split with its cached features and the training label of every cached patch."""

    dataset: Dataset
    store: FeatureStore
    labels: np.ndarray  # (P,) int64: class, C for background, IGNORE


def patch_labels(store: FeatureStore, dataset: Dataset) -> np.ndarray:
    """Labels of all cached patches; view 0 uses the current annotations, augmented views their own boxes."""
    num_classes = len(dataset.classes)
    labels = np.full(store.num_patches, IGNORE, np.int64)
    for i in range(len(store)):
        if not store.ok[i]:
            continue
        rec = dataset.records[store.record[i]]
        objects = (rec.boxes, rec.box_classes, rec.box_difficult) if store.view[i] == 0 else store.item_objects(i)
        s = store.item_slice(i)
        labels[s] = label_patches(store.patch_boxes[s], *objects, num_classes, image_labels=rec.labels)
    return labels


def prepare_split(recipe: Recipe, split: str, extractor: PatchExtractor, views: int = 0,
                  progress: bool = True) -> SplitData:
    dataset = open_split(recipe.data, split)
    store = build_features(recipe, dataset, extractor, views=views, progress=progress)
    return SplitData(dataset, store, patch_labels(store, dataset))


def epoch_indices(labels: np.ndarray, num_classes: int, bg_rate: float, seed: int, epoch: int) -> np.ndarray:
    """Shuffled patch indices of one epoch: all positives and a fresh ``bg_rate`` share of background."""
    rng = np.random.default_rng([seed, epoch])
    positives = np.flatnonzero((labels >= 0) & (labels < num_classes))
    background = np.flatnonzero(labels == num_classes)
    chosen = background[rng.random(len(background)) < bg_rate]
    return rng.permutation(np.concatenate([positives, chosen]))


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


def build_extractor(recipe: Recipe) -> PatchExtractor:
    b = recipe.backbone
    device = b.device
    if device == "auto" and torch.cuda.is_available() and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    backbone = build_backbone(b.name, b.weights, b.input_size, b.layer)
    return PatchExtractor(backbone, recipe.patches, replace(b, device=device))


def make_optimizer(head: AdaptationHead, recipe: Recipe) -> torch.optim.SGD:
    """SGD with both parameter groups from the start (weights decayed, biases not), so resume matches."""
    t = recipe.train
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in head.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD([{"params": weights, "weight_decay": t.weight_decay},
                            {"params": biases, "weight_decay": 0.0}], lr=t.lr, momentum=t.momentum)


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


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_map07: float
    table: APTable | None
    seconds: float


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the adaptation head of ``recipe``; checkpoints go to ``recipe.run_dir``."""
    init_distributed()
    rank, world = _rank_world()
    started = time.perf_counter()
    run_dir = recipe.run_dir
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    state = None
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"--resume: {last_path} does not exist; start without --resume")
        state = load_checkpoint(last_path)
        if _without_epochs(state["recipe"]) != _without_epochs(recipe.to_dict()):
            raise CheckpointError(f"--resume: {last_path} was made with another recipe; resume with the saved one: "
                                  f"patchnet train --recipe {run_dir / 'recipe.yaml'} --resume")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")

    extractor = build_extractor(recipe)
    train_data = prepare_split(recipe, recipe.data.train_split, extractor, views=recipe.aug.views, progress=progress)
    val_data = (prepare_split(recipe, recipe.data.val_split, extractor, progress=progress)
                if recipe.data.val_split else None)
    classes = train_data.dataset.classes
    num_classes = len(classes)
    _log_split("train", train_data)

    t = recipe.train
    torch.manual_seed(t.seed)
    device = extractor.device
    head = AdaptationHead(extractor.feature_dim, num_classes, recipe.head.hidden, recipe.head.dropout).to(device)
    optimizer = make_optimizer(head, recipe)
    schedule = LRSchedule(optimizer, recipe)
    epoch, step_in_epoch, best, history = 0, 0, -1.0, []
    carry = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    if state is not None:
        check_compatible(state, last_path, recipe.backbone.name, classes, extractor.feature_dim)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        epoch, step_in_epoch, best = state["epoch"], state["step"], state["best_map07"]
        history, carry = list(state["history"]), dict(state["carry"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming %s at epoch %d, step %d", run_dir, epoch + 1, step_in_epoch)
    model = torch.nn.parallel.DistributedDataParallel(head) if world > 1 else head

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    def checkpoint(path: Path, done_epoch: int, step: int, rng: torch.Tensor | None = None) -> None:
        if rank:
            return
        save_checkpoint({
            "head": head.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "epoch": done_epoch, "step": step, "best_map07": best, "history": history, "carry": carry,
            "torch_rng": torch.get_rng_state() if rng is None else rng, "recipe": recipe.to_dict(), "classes": classes,
            "feature_dim": extractor.feature_dim, "weights_id": extractor.backbone.weights_id,
        }, path)

    table = None
    step_rng = torch.get_rng_state()  # dropout's RNG before the current step, for an exact mid-epoch resume
    features = train_data.store.features
    labels = train_data.labels
    try:
        while epoch < t.epochs:
            order = epoch_indices(labels, num_classes, t.bg_rate, t.seed, epoch)
            # whole batches only, so that one process and several see the same global batches
            per_rank = max(1, t.batch_size // world)
            steps = max(1, len(order) // (per_rank * world))
            order = order[rank::world]
            head.train()
            bar = tqdm(total=steps, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch",
                       disable=not progress or rank != 0, dynamic_ncols=True, leave=False)
            tick = time.perf_counter()
            for step in range(step_in_epoch, steps):
                step_rng = torch.get_rng_state()
                idx = np.sort(order[step * per_rank:(step + 1) * per_rank])
                x = torch.from_numpy(np.asarray(features[idx], dtype=np.float32)).to(device)
                y = torch.from_numpy(labels[idx]).to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr {optimizer.param_groups[0]['lr']:.3g}); last batch: features mean {x.mean():.3g}, "
                        f"std {x.std():.3g}, max |x| {x.abs().max():.3g}, any non-finite: {not torch.isfinite(x).all()}; "
                        f"labels {np.bincount(labels[idx], minlength=num_classes + 1).tolist()}. "
                        f"{last_path} is left as it was; lower train.lr or check the feature cache.")
                loss_sum, correct = loss.item() * len(idx), int((logits.argmax(1) == y).sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                carry = {"loss_sum": carry["loss_sum"] + loss_sum, "correct": carry["correct"] + correct,
                         "seen": carry["seen"] + len(idx)}
                step_in_epoch, step_rng = step + 1, torch.get_rng_state()
                bar.update(1)
                bar.set_postfix(loss=f"{carry['loss_sum'] / carry['seen']:.4f}",
                                patches_s=f"{carry['seen'] / max(time.perf_counter() - tick, 1e-9):.0f}", refresh=False)
            bar.close()
            totals = torch.tensor([carry["loss_sum"], carry["correct"], carry["seen"]], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(totals)
            epoch_loss, epoch_acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
            lr = optimizer.param_groups[0]["lr"]
            epoch += 1
            step_in_epoch, carry = 0, {"loss_sum": 0.0, "correct": 0, "seen": 0}
            record = {"epoch": epoch, "loss": epoch_loss, "patch_acc": epoch_acc, "lr": lr,
                      "seconds": round(time.perf_counter() - tick, 3)}
            if val_data is not None and (epoch % t.eval_every == 0 or epoch == t.epochs) and rank == 0:
                table = evaluate_head(head, val_data, recipe.infer.k)
                record.update(map07=table.map07, map=table.map)
                if table.map07 > best:
                    best = table.map07
                    checkpoint(best_path, epoch, 0)
            keep_going = schedule.step(epoch, epoch_loss)
            history.append(record)
            if writer is not None:
                _log_epoch(writer, record, table if "map07" in record else None)
                if "map07" in record and t.heatmaps:
                    log_heatmaps(writer, head, val_data, recipe, epoch)
            if rank == 0:
                log.info("epoch %d: loss %.4f, patch accuracy %.3f, lr %.3g%s", epoch, epoch_loss, epoch_acc, lr,
                         f", val mAP {100 * record['map07']:.1f} (11-pt) {100 * record['map']:.1f} (env)"
                         if "map07" in record else "")
            step_rng = torch.get_rng_state()
            checkpoint(last_path, epoch, 0)
            if not keep_going:
                log.info("loss plateaued after %d learning-rate decays: stopping at epoch %d", schedule.decays, epoch)
                break
    except KeyboardInterrupt:
        checkpoint(last_path, epoch, step_in_epoch, rng=step_rng)
        log.warning("interrupted: saved %s at epoch %d, step %d; continue with --resume", last_path, epoch + 1,
                    step_in_epoch)
        raise
    finally:
        if writer is not None:
            writer.close()
    if val_data is None and rank == 0:
        checkpoint(best_path, epoch, 0)  # without validation, the last head is the best we know
    return TrainResult(run_dir, epoch, best, table, time.perf_counter() - started)


def _without_epochs(values: dict) -> dict:
    """A recipe dict without train.epochs: a resumed run may be extended."""
    return {**values, "train": {k: v for k, v in values["train"].items() if k != "epochs"}}


def evaluate_head(head: AdaptationHead, split: SplitData, k: float) -> APTable:
    """VOC APs of the head on a split's cached features (view 0 of each readable image)."""
    scores, keep = score_store(head, split.store, k)
    records = [split.dataset.records[r] for r in split.store.record[keep]]
    labels = np.stack([r.labels for r in records])
    return ap_table(scores[keep], labels, split.dataset.classes)


def _log_split(name: str, data: SplitData) -> None:
    c = len(data.dataset.classes)
    counts = np.bincount(np.where(data.labels == IGNORE, c + 1, data.labels), minlength=c + 2)
    log.info("%s: %d images, %d patches: %d positive, %d background, %d ignored", name, len(data.dataset),
             len(data.labels), counts[:c].sum(), counts[c], counts[c + 1])


def _log_epoch(writer, record: dict, table: APTable | None) -> None:
    e = record["epoch"]
    writer.add_scalar("train/loss", record["loss"], e)
    writer.add_scalar("train/patch_accuracy", record["patch_acc"], e)
    writer.add_scalar("train/lr", record["lr"], e)
    if table is not None:
        writer.add_scalar("val/mAP_11pt", table.map07, e)
        writer.add_scalar("val/mAP_envelope", table.map, e)
        for c, a in zip(table.classes, table.ap07):
            if not np.isnan(a):
                writer.add_scalar(f"val_ap_11pt/{c}", a, e)
    writer.flush()
