"""Matplotlib figures without global state: built on ``matplotlib.figure.Figure`` (the user's backend is never
changed), saved atomically, every user-supplied text shown as plain text (no mathtext)."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import PatchnetError
from ..files import atomic_write, printable


def plain(text: object) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` would otherwise start mathtext (and ``$x_$`` crash)."""
    return printable(text).replace("$", r"\$")


def new_figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (6.4, 4.8), **subplots):
    """A figure and its (rows, cols) array of axes, like ``plt.subplots(..., squeeze=False)``."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False, **subplots)


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, out: str | Path, dpi: int = 100) -> Path:
    """Write a figure as PNG (or the format its suffix names), atomically, creating the folder."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in FORMATS:
        raise FigureError(
            f"{out}: figures are written as {', '.join(sorted(FORMATS))}; name the file with one of "
            "those suffixes, e.g. labels.png"
        )
    return atomic_write(out, figure_bytes(fig, fmt, dpi))


FORMATS = {"png", "jpg", "jpeg", "pdf", "svg"}


class FigureError(PatchnetError, ValueError):
    """A figure that cannot be written as asked."""
