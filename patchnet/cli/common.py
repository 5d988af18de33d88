"""What every command shares: the typer app, the session that turns errors about the user's input into one line,
the count of inputs skipped, and the options several commands take."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from ..errors import PatchnetError
from ..files import printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Multi-scale patch-based transfer learning on a frozen ImageNet CNN.",
)
log = logging.getLogger("patchnet")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("patchnet")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from .. import __version__ as number
        typer.echo(f"patchnet {number}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Multi-scale patch-based transfer learning on a frozen ImageNet CNN."""


# typer's rich help prints a type beside every option, "<bool>" beside flags, which take no value (typer
# 0.29: the plain help leaves it out): give flags no type column.
_option_type = typer.core.TyperOption.display_type_rich


def _flag_type(self: typer.core.TyperOption, ctx) -> str | None:
    return None if self.is_flag else _option_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


class PrintableLog(logging.Filter):
    """Log lines made ``printable``: a file name that is not UTF-8 in a warning would make the handler fail."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(record.getMessage()), ()
        return True


@contextmanager
def session(verbose: bool = False):
    """Log through tqdm, and turn errors about the user's input into one line and exit code 2."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("patchnet").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(f, PrintableLog) for f in log.filters):
        log.addFilter(PrintableLog())
    try:
        with logging_redirect_tqdm():
            yield
    except PatchnetError as e:
        typer.echo(f"error: {printable(e)}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # a path the user gave that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(printable(f"error: {where}{e.strerror or e}; check the path and its permissions"), err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


class Skipped:
    """Inputs that could not be read: each is warned about as it happens, and the rest goes on; ``finish``
    then says how many failed and exits with code 1 (the outputs of the others are written first)."""

    failed: dict[str, str]  # name -> error

    def __init__(self, total: int, what: str = "images"):
        self.total, self.what, self.failed = total, what, {}

    def add(self, name: str, error: Exception | str) -> None:
        log.warning("skipped %s", error if str(name) in str(error) else f"{name}: {error}")
        self.failed[str(name)] = str(error)

    def finish(self) -> None:
        if self.failed:
            typer.echo(
                f"{len(self.failed)} of {self.total} {self.what} could not be read and were skipped (listed above)",
                err=True,
            )
            raise typer.Exit(1)


def resolve_checkpoint(value: Path | None) -> Path:
    """The checkpoint a command scores with: the ``--checkpoint`` given (a file, or a shipped model's name),
    else the shipped VOC model."""
    from ..models import DEFAULT
    from ..models import resolve_checkpoint as resolve

    return resolve(DEFAULT if value is None else value)


def table_folder(checkpoint: Path) -> Path:
    """Where a command writes tables about a checkpoint by default: beside it; for a shipped model (inside the
    installed package, never written to) checkpoints/<name>/."""
    from ..models import is_shipped
    from ..models import resolve_checkpoint as resolve

    path = resolve(checkpoint)
    return Path("checkpoints") / path.stem if is_shipped(path) else path.parent


CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="The trained model: a best.pt or last.pt, or a shipped model's name (voc07). Default: voc07.",
        show_default=False,
    ),
]
RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: section.field=value.")]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Dataset root: VOCdevkit/VOC20xx, a COCO folder, an image folder or a folder of <split>.csv lists.",
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="Dataset format: voc, coco, demo, folder or csv.")]
PoolChoice = Annotated[
    str | None,
    typer.Option("--pool", help="Pooling of patch scores: power, max, lse or topk (default: the model's own)."),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="Where the model runs: auto, cpu, cuda or cuda:N. Default: the recipe's runtime.device (auto: a GPU "
        "where there is one).",
        show_default=False,
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log debugging detail.")]


def on_device(recipe, device: str | None):
    """``recipe`` with ``--device`` (when given) as its runtime.device; returns it."""
    if device:
        check_device(device)
        recipe.runtime.device = device
    return recipe


def check_device(device: str | None) -> None:
    """A ``--device`` that cannot be used (unknown, or CUDA where there is none) refused before any work."""
    if device:
        from ..dist import resolve_device

        resolve_device(device)


DataArg = Annotated[
    Path | None,
    typer.Argument(
        help="Your images: a folder per class, train/ and val/ folders of them, a VOC devkit, a COCO or Roboflow "
        "export, or <split>.csv lists. What is found (format, splits, classes) is printed first.",
        show_default=False,
    ),
]
DataFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format", help="Read DATA as voc, coco, csv or folder (where it looks like several).", show_default=False
    ),
]
# how eval --localize and localize turn score maps into boxes (patchnet.evaluation.localize)
BoxMethodOpt = Annotated[
    str | None,
    typer.Option(
        "--box-method",
        help="Boxes: mil (the detection head of train.detector), map (regions of the score map), patch or whole "
        "(baselines) (default: infer.box_method, auto: mil where the checkpoint has a detection head, else map).",
    ),
]
BoxThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--box-threshold",
        help="Boxes, map: where to cut, from the map's floor (0) to its peak (1) (default: infer.box_threshold).",
    ),
]
