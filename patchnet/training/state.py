"""Everything a training run must get back on resume: the head (and unlocked stages), the optimizer with every
parameter group it will ever have, the learning-rate schedule, counters, running sums, the last evaluation's
calibration and fusion, and the RNG state."""

from __future__ import annotations

import json
import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, CheckpointError, check_compatible, load_checkpoint, load_head
from ..dist import get_rank
from ..head.layers import AdaptationHead
from ..recipe import Recipe, recipe_from_dict
from .unlock import UnlockedStages


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
        groups += [
            {"params": [p for p in trunk if p.ndim > 1], "weight_decay": t.weight_decay, "lr": lr},
            {"params": [p for p in trunk if p.ndim <= 1], "weight_decay": 0.0, "lr": lr},
        ]
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)


class LRSchedule:
    """Step decays at fractions of the run, or division by 10 when the loss plateaus (at most ``max_decays``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: Recipe):
        self.optimizer, self.t = optimizer, recipe.train
        self.decays, self.best, self.bad_epochs = 0, math.inf, 0
        self.milestones = sorted({max(1, round(f * self.t.epochs)) for f in self.t.milestones})

    def stops(self, loss: float) -> bool:
        """Whether ``step`` with this epoch's ``loss`` will end the run (a plateau after the last decay)."""
        return (
            self.t.schedule == "plateau"
            and loss >= self.best * (1 - 1e-3)
            and self.bad_epochs + 1 > self.t.plateau_patience
            and self.decays >= self.t.max_decays
        )

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

    def add(self, loss: float, correct: int, patches: int) -> EpochSums:
        return EpochSums(self.loss_sum + loss, self.steps + 1, self.correct + correct, self.patches + patches)


def rng_state(device: torch.device) -> dict:
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

    def __init__(
        self, head: AdaptationHead, recipe: Recipe, device: torch.device, stages: UnlockedStages | None = None
    ):
        self.head, self.stages, self.device = head, stages, device
        self.optimizer = make_optimizer(head, recipe, stages)
        self.schedule = LRSchedule(self.optimizer, recipe)
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.history: list[dict] = []
        self.sums = EpochSums()
        self.calibration: dict | None = None
        self.fusion: dict | None = None
        self.rng = rng_state(device)

    def checkpoint(self, facts: Checkpoint) -> Checkpoint:
        """The checkpoint of this state: ``facts`` (the run's recipe, classes, trunk, codec, data fingerprint)
        with this state's weights, calibration, fusion, history and everything resuming reads."""
        trunk = None if self.stages is None else {k: v.cpu() for k, v in self.stages.state().items()}
        training = {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_map07": self.best,
            "carry": asdict(self.sums),
            "rng": dict(self.rng),
        }
        return replace(
            facts,
            head=self.head.state_dict(),
            trunk=trunk,
            calibration=self.calibration,
            fusion=self.fusion,
            history=list(self.history),
            training=training,
        )

    def restore(self, saved: Checkpoint, path: str | Path = "the checkpoint") -> None:
        """Take back the state ``saved`` holds (its weights, counters, schedule, sums and random states)."""
        state = saved.resume_state(Path(path))
        load_head(self.head, saved.head, path)
        if self.stages is not None:
            if saved.trunk is None:
                raise CheckpointError(f"{path}: its recipe unlocks trunk stages, but it carries no trained stages")
            self.stages.load(saved.trunk)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best_map07"]
        self.history, self.calibration, self.fusion = list(saved.history), saved.calibration, saved.fusion
        self.sums = EpochSums(**state["carry"])
        self.rng = dict(state["rng"])
        _set_rng_state(self.rng, self.device)


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


def saved_run(recipe: Recipe) -> Checkpoint:
    """last.pt of the run to resume, checked to come from the same recipe (its data: ``check_same_data``)."""
    last_path = recipe.run_dir / "last.pt"
    if not last_path.is_file():
        raise CheckpointError(f"--resume: {last_path} does not exist; start without --resume")
    saved = load_checkpoint(last_path)
    saved.resume_state(last_path)
    if resume_key(recipe_from_dict(saved.recipe).to_dict()) != resume_key(recipe.to_dict()):
        raise CheckpointError(
            f"--resume: {last_path} was made with another recipe; resume with the saved one: "
            f"patchnet train --recipe {recipe.run_dir / 'recipe.yaml'} --resume"
        )
    return saved


def resume_key(values: dict) -> dict:
    """What a resumed run must share with the saved one: all but the runtime section, train.epochs (a
    finished run may be extended) and data.classes (an empty list is filled in with the classes found;
    the class lists themselves are compared by check_compatible)."""
    return {
        **{k: v for k, v in values.items() if k != "runtime"},
        "train": {k: v for k, v in values["train"].items() if k != "epochs"},
        "data": {k: v for k, v in values["data"].items() if k != "classes"},
    }


def resume_run(state: TrainState, saved: Checkpoint, recipe: Recipe, extractor, classes: list[str]) -> None:
    """Load the saved run into ``state``, refusing one made for another backbone, weights or class list."""
    last = recipe.run_dir / "last.pt"
    check_compatible(saved, last, recipe.backbone.name, classes, extractor.feature_dim, extractor.backbone.weights_id)
    state.restore(saved, last)
    rank = get_rank()
    if rank:
        sums = sums_path(recipe.run_dir, rank)
        state.sums = EpochSums(**json.loads(sums.read_text())) if sums.is_file() else EpochSums()


def sums_path(run_dir: Path, rank: int) -> Path:
    """Under DDP an interrupted rank keeps its own running sums here (rank 0's are in last.pt)."""
    return run_dir / f"carry.rank{rank}.json"
