"""patchnet: multi-scale, patch-based transfer learning on a frozen ImageNet CNN (Oquab et al., CVPR 2014).

    import patchnet
    model = patchnet.load("voc07")            # the shipped model, or a best.pt / last.pt
    model.predict("photo.jpg")
    run = patchnet.train("photos/")           # as `patchnet train photos/`
    patchnet.load(run.best).predict("new.jpg")

``load`` gives a ``patchnet.api.Model``; the modules below it follow the data flow (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .threads import configure as _configure_threads

_configure_threads()  # before any module loads torch: its thread count and how its threads wait (threads.py)

if TYPE_CHECKING:
    from .api import Model
    from .training.hooks import HookBase
    from .training.trainer import TrainResult

__all__ = ["load", "train"]
__version__ = "0.1.0"


def load(
    checkpoint,
    device: str | None = None,
    pool: str | None = None,
    fuse: bool = True,
    precision: str | None = None,
    options=None,
) -> Model:
    """A trained checkpoint (``best.pt`` or ``last.pt``) ready to predict, draw score maps and localise
    (``patchnet.api.Model``); ``options``: a ``patchnet.evaluation.scoring.InferOptions`` (``patchnet.api.load``).
    Importing ``patchnet`` alone loads no torch; ``load`` does."""
    from .api import load as _load

    return _load(checkpoint, device=device, pool=pool, fuse=fuse, precision=precision, options=options)


def train(
    data=None,
    recipe=None,
    *,
    name: str | None = None,
    epochs: int | None = None,
    backbone: str | None = None,
    device: str | None = None,
    out=None,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    hooks: Sequence[HookBase] = (),
) -> TrainResult:
    """Train on a folder of images (its format, splits and classes found as ``patchnet train DATA`` finds them)
    or as a recipe file says; ``overrides`` are ``--set`` strings; an earlier run of the same name is
    continued with ``resume`` or replaced with ``overwrite`` (its files cleared first); ``hooks`` are
    ``patchnet.training.hooks.HookBase`` objects the trainer calls around steps and epochs. Returns the run's
    ``TrainResult`` (its ``run_dir``, ``best`` and ``last`` checkpoints, and the val split's ``table``)."""
    from .training.setup import RunOptions, check_new_run, open_run_splits, run_recipe
    from .training.trainer import train as _train

    options = RunOptions(name, epochs, backbone, device, None if out is None else str(out))
    r, _ = run_recipe(data, recipe, overrides, options)
    check_new_run(r, resume, overwrite)
    datasets = open_run_splits(r) if data is not None else None
    return _train(r, resume=resume, progress=progress, datasets=datasets, overwrite=overwrite, hooks=hooks)
