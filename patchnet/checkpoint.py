"""The checkpoint: one typed record of a trained head with what scoring and resuming need, one ``save`` (atomic)
and one ``load`` (tensors and plain containers only, checked field by field); the fingerprint of the data a
run trained on, which ``--resume`` compares with the data now; the run folder's lock and its clearing.

On disk a checkpoint is a flat dict (``Checkpoint.to_dict``), as files written before format 2 were:
those load unchanged (the shipped ``voc07.pt`` among them), and a file of a newer format is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import PatchnetError
from .files import LockHeld, atomic_write, file_lock

log = logging.getLogger("patchnet")

FORMAT = 2  # 1: the untyped dicts written before the format was recorded; 2 adds "format" and "data"
# what only resuming reads: a slim checkpoint (the shipped models) carries none of these
TRAINING: dict[str, tuple[type, ...]] = {
    "optimizer": (dict,),
    "schedule": (dict,),
    "epoch": (int,),
    "step": (int,),
    "best_map07": (float, int),
    "carry": (dict,),
    "rng": (dict,),
}
# field -> (accepted types, required); None stands for an optional field's absence
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "head": ((dict,), True),
    "recipe": ((dict,), True),
    "classes": ((list, tuple), True),
    "feature_dim": ((int,), True),
    "weights_id": ((str, type(None)), False),
    "codec": ((dict, type(None)), False),
    "int8": ((dict, type(None)), False),
    "trunk": ((dict, type(None)), False),
    "calibration": ((dict, type(None)), False),
    "fusion": ((dict, type(None)), False),
    "history": ((list,), False),
    "card": ((dict, type(None)), False),
    "data": ((dict, type(None)), False),
    "detector": ((dict, type(None)), False),
}
REMEDY = "use a best.pt or last.pt written by patchnet train, or a shipped model by name"


class CheckpointError(PatchnetError, ValueError):
    """A checkpoint that cannot be used as asked."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, a lost folder); the previous file is intact."""


class RunFolderBusy(CheckpointError):
    """Another process is training in the run folder."""


# --------------------------------------------------------------------------- the data fingerprint


class ImageFile(Protocol):
    """What the fingerprint reads of a dataset record."""

    image_id: str
    path: Path


@dataclass
class DataFingerprint:
    """The data a run trained on: its training images (id -> [file size, modification time in ns]), its
    classes, the number of processes, and ``data.root`` as given and as resolved when the run started."""

    root: str
    resolved: str
    classes: list[str]
    world: int
    images: dict[str, list[int]]

    @classmethod
    def of(cls, root: str, records: Iterable[ImageFile], classes: list[str], world: int) -> DataFingerprint:
        """The fingerprint of ``records`` now."""
        images = {}
        for r in records:
            try:
                st = r.path.stat()
                images[r.image_id] = [st.st_size, st.st_mtime_ns]
            except OSError:  # gone since it was listed: it differs from any file it was
                images[r.image_id] = [-1, -1]
        return cls(str(root), str(Path(root).resolve()), list(classes), world, images)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: Path) -> DataFingerprint:
        try:
            fp = cls(**values)
            ok = isinstance(fp.images, dict) and isinstance(fp.classes, list) and isinstance(fp.world, int)
        except TypeError:
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: field 'data' is not a data fingerprint ({sorted(values)}); {REMEDY}")
        return fp

    def changes(self, now: DataFingerprint) -> list[str]:
        """What differs from ``now``, one phrase each (empty when nothing does)."""
        out = []
        added = [i for i in now.images if i not in self.images]
        removed = [i for i in self.images if i not in now.images]
        changed = [i for i, v in now.images.items() if i in self.images and list(self.images[i]) != list(v)]
        for n, what, ids in ((len(added), "added", added), (len(removed), "removed", removed)):
            if n:
                out.append(f"{_images(n)} {what} (e.g. {', '.join(map(repr, ids[:3]))})")
        if changed:
            out.append(
                f"{_images(len(changed))} changed (size or modification time; e.g. {', '.join(map(repr, changed[:3]))})"
            )
        if self.classes != now.classes:
            gone, new = sorted(set(self.classes) - set(now.classes)), sorted(set(now.classes) - set(self.classes))
            out.append(f"classes {self.classes} then, {now.classes} now (new: {new}, gone: {gone})")
        if self.world != now.world:
            out.append(f"{self.world} training process{'es' if self.world > 1 else ''} then, {now.world} now")
        if out and self.resolved != now.resolved:
            relative = " (relative: it depends on the folder you run from)" if not Path(now.root).is_absolute() else ""
            out.append(f"data.root {now.root!r}{relative} points to {now.resolved}, and pointed to {self.resolved}")
        return out


def _images(n: int) -> str:
    return f"{n} training image{'s' if n != 1 else ''}"


def check_same_data(saved: DataFingerprint | None, now: DataFingerprint, path: Path) -> None:
    """Refuse to resume the run of ``path`` on data that changed since, saying what changed and what to do."""
    if saved is None:  # written before checkpoints carried a fingerprint: the recipe check alone holds
        log.info("%s carries no data fingerprint (an older patchnet wrote it): the data is not compared", path)
        return
    changes = saved.changes(now)
    if changes:
        raise CheckpointError(
            f"--resume: the data changed since {path} was written: {'; '.join(changes)}. A resumed run must "
            "see the data it started on: restore it (or run from the folder the run started in, with as many "
            "processes), or train anew on the data as it is now with --overwrite"
        )
    if saved.resolved != now.resolved:
        log.info("data.root now points to %s (was %s); the images there are the same", now.resolved, saved.resolved)


# --------------------------------------------------------------------------- the checkpoint


@dataclass
class Checkpoint:
    """A trained head and its facts: the recipe it was trained with, its classes, the trunk's feature size
    and weights, the feature codec and int8 ranges, the calibration and fusion fitted on the selection
    images, the training history; ``training`` holds what resuming alone reads (optimizer, schedule,
    counters, sums, random states: ``TRAINING``), ``data`` the fingerprint of the training data."""

    head: dict[str, torch.Tensor]
    recipe: dict[str, Any]
    classes: list[str]
    feature_dim: int
    weights_id: str | None = None
    codec: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None
    trunk: dict[str, torch.Tensor] | None = None
    calibration: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] | None = None
    data: DataFingerprint | None = None
    card: dict[str, Any] | None = None
    detector: dict[str, Any] | None = None  # train.detector: the detection head's weights and trunk geometry
    version: int = FORMAT  # of the file it was loaded from; saving writes the current one

    def to_dict(self) -> dict[str, Any]:
        """The flat dict saved (absent optional fields left out), readable by ``torch.load(weights_only=True)``."""
        out: dict[str, Any] = {"format": FORMAT}
        for name in FIELDS:
            value = getattr(self, name)
            if name == "data" and value is not None:
                value = value.to_dict()
            if value is not None:
                out[name] = value
        return {**out, **(self.training or {})}

    @classmethod
    def from_dict(cls, state: object, path: Path) -> Checkpoint:
        """Check ``state`` field by field, naming ``path`` and the first field missing or of the wrong type."""
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{path}: not a patchnet checkpoint (it holds a {type(state).__name__}, not a dict); {REMEDY}"
            )
        version = state.get("format", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{path}: field 'format' should be an int, not {type(version).__name__}; {REMEDY}")
        if version > FORMAT:
            raise CheckpointError(
                f"{path}: written in checkpoint format {version} by a newer patchnet; this one reads formats up to "
                f"{FORMAT}: upgrade patchnet (pip install -U patchnet)"
            )
        missing = [k for k, (_, required) in FIELDS.items() if required and k not in state]
        if missing:
            raise CheckpointError(f"{path}: not a patchnet checkpoint (missing {', '.join(missing)}); {REMEDY}")
        present = [k for k in TRAINING if k in state]
        if present and len(present) < len(TRAINING):  # some of the resume state but not all: a damaged file
            gone = [k for k in TRAINING if k not in state]
            raise CheckpointError(f"{path}: a damaged checkpoint (missing {', '.join(gone)}); {REMEDY}")
        for name, (types, _) in {**FIELDS, **{k: (t, False) for k, t in TRAINING.items()}}.items():
            _check_type(state, name, types, path)
        for name in ("head", "trunk"):
            bad = [k for k, v in (state.get(name) or {}).items() if not isinstance(v, torch.Tensor)]
            if name == "head" and isinstance(state.get("detector"), dict):
                weights = state["detector"].get("head")
                if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
                    raise CheckpointError(f"{path}: field 'detector' holds no tensors under 'head'; {REMEDY}")
            if bad:
                raise CheckpointError(f"{path}: field {name!r} holds {bad[0]!r}, which is not a tensor; {REMEDY}")
        if not all(isinstance(c, str) for c in state["classes"]):
            raise CheckpointError(f"{path}: field 'classes' should hold class names (strings); {REMEDY}")
        data = state.get("data")
        get = state.get
        return cls(
            head=state["head"],
            recipe=state["recipe"],
            classes=list(state["classes"]),
            feature_dim=state["feature_dim"],
            weights_id=get("weights_id"),
            codec=get("codec"),
            int8=get("int8"),
            trunk=get("trunk"),
            calibration=get("calibration"),
            fusion=get("fusion"),
            history=list(get("history") or []),
            card=get("card"),
            detector=get("detector"),
            training={k: state[k] for k in TRAINING} if present else None,
            data=None if data is None else DataFingerprint.from_dict(data, path),
            version=version,
        )

    def resume_state(self, path: Path) -> dict[str, Any]:
        """What resuming reads (``TRAINING``), refused where the checkpoint is a slim one without it."""
        if self.training is None:
            raise CheckpointError(
                f"--resume: {path} holds a trained head but no training state (optimizer, counters): it cannot be "
                "resumed; train anew with --overwrite"
            )
        return self.training


def _check_type(state: dict[str, Any], name: str, types: tuple[type, ...], path: Path) -> None:
    if name not in state:
        return
    value = state[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        want = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise CheckpointError(
            f"{path}: field {name!r} should be {want}, not {type(value).__name__}; the file was edited or made by "
            f"another program; {REMEDY}"
        )


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write atomically and durably (fsynced before the rename): a kill, a power loss or a full disk mid-write
    leaves the previous file intact. A failed write is a ``CheckpointSaveError`` naming the folder."""
    path = Path(path)
    state = checkpoint.to_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch reports a failed write of its zip stream as a RuntimeError
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in str(e).lower()
        why = "the disk is full" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0][:200])
        before = f"the previous {path.name} is intact" if path.is_file() else f"no earlier {path.name} was there"
        fix = "free some space" if full else "check the folder and its permissions"
        raise CheckpointSaveError(
            f"{path.parent}: could not write {path.name} ({why}); {before}. {fix.capitalize()}, then continue "
            "with --resume (from the last checkpoint saved)"
        ) from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a patchnet checkpoint safely (tensors and plain containers only, no code) and check it: a file, or
    the name of a shipped model (``voc07``)."""
    from .models import SHIPPED, resolve_checkpoint

    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; runs write checkpoints/<name>/best.pt and last.pt, and the "
            f"shipped models go by name ({', '.join(SHIPPED)})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable patchnet checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]}): "
            f"a damaged, truncated or foreign file; {REMEDY}"
        ) from None
    return Checkpoint.from_dict(state, path)


def load_head(head: nn.Module, weights: dict[str, torch.Tensor] | None, path: str | Path, key: str = "head") -> None:
    """Load a checkpoint's weights (its ``key`` field) into ``head``, with one clear error where they do not
    fit it."""
    try:
        if weights is None:
            raise KeyError(key)
        head.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as e:
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        raise CheckpointError(
            f"{path}: its {key} does not fit the model its recipe builds ({shapes}): "
            f"{str(e).splitlines()[0][:300]}. The file was edited or made by another version; "
            "use a checkpoint written by patchnet train with this recipe"
        ) from None


def check_compatible(
    ckpt: Checkpoint,
    path: str | Path,
    backbone: str,
    classes: list[str],
    feature_dim: int,
    weights_id: str | None = None,
) -> None:
    """Refuse a checkpoint made for another backbone, weights or class list, saying what differs."""
    theirs = (ckpt.recipe.get("backbone") or {}).get("name")
    if theirs != backbone or ckpt.feature_dim != feature_dim:
        raise CheckpointError(
            f"{path}: trained on backbone {theirs} ({ckpt.feature_dim}-d features), "
            f"but this run uses {backbone} ({feature_dim}-d)"
        )
    if weights_id is not None and ckpt.weights_id not in (None, weights_id):
        raise CheckpointError(
            f"{path}: trained on features of backbone weights {ckpt.weights_id!r}, but this "
            f"run's {backbone} has weights {weights_id!r}; its head would score features it never "
            "saw. Use the same backbone.weights as the checkpoint's recipe.yaml"
        )
    if list(ckpt.classes) != list(classes):
        raise CheckpointError(f"{path}: trained for classes {ckpt.classes}, but the data has {classes}")


# --------------------------------------------------------------------------- the run folder

# the files a run writes in its folder (and eval / study tables beside its checkpoints): what --overwrite clears
RUN_FILES = (
    "best.pt",
    "last.pt",
    "recipe.yaml",
    "carry.rank*.json",
    "eval_*.json",
    "eval_*.csv",
    "linear_*.json",
    "linear_*.csv",
    "confusion_*.png",
    "tensorboard/events.out.tfevents.*",
)


def clear_run(run_dir: Path) -> list[Path]:
    """Remove the files an earlier run left in ``run_dir`` (``RUN_FILES`` only: never a file patchnet does not
    write, should the folder hold others); returns them."""
    gone = sorted(p for pattern in RUN_FILES for p in run_dir.glob(pattern) if p.is_file())
    for p in gone:
        p.unlink()
    with contextlib.suppress(OSError):  # left where it holds something else
        (run_dir / "tensorboard").rmdir()
    if gone:
        log.info("--overwrite: removed %d files of the earlier run in %s", len(gone), run_dir)
    return gone


@contextlib.contextmanager
def run_folder(run_dir: Path, overwrite: bool = False, lock: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for the block (``lock``: rank 0 of a run takes it), refusing at once a
    folder another process trains in; with ``overwrite``, clear the earlier run's files first."""
    with contextlib.ExitStack() as stack:
        if lock:
            try:
                stack.enter_context(file_lock(run_dir / ".lock", f"the run folder {run_dir}", wait=False))
            except LockHeld as e:
                raise RunFolderBusy(
                    f"{run_dir}: another run is training in this folder (pid {e.holder}); wait for it to end "
                    "(or stop it), or name this run otherwise with --name NAME"
                ) from None
            if overwrite:
                clear_run(run_dir)
        yield
