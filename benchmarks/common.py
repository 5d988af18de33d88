"""Shared set-up of the benchmarks: the real VOC2007 images in ../shared/data, timing, and tables."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
VOC = REPO.parent / "shared" / "data" / "VOCdevkit" / "VOC2007"
DEV_RECIPE = REPO / "recipes" / "voc07_dev.yaml"


def require_voc(root: Path | str = VOC) -> Path:
    root = Path(root)
    if not (root / "ImageSets" / "Main" / "devval.txt").is_file():
        raise SystemExit(f"benchmark data not found at {root}: the benchmarks run on the VOC2007 images of "
                         "../shared/data (pass --voc /path/to/VOCdevkit/VOC2007)")
    return root


def machine() -> str:
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {threads} torch threads, {gpu}, torch {torch.__version__}"


class Timer:
    """Wall seconds of a block; CUDA work queued inside it is waited for at both ends."""

    def __enter__(self):
        _sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync()
        self.seconds = time.perf_counter() - self.start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def table(rows: list[tuple], headers: tuple) -> str:
    """A Markdown table."""
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in r) for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "| " + " | ".join("-" * w for w in width) + " |"] + [fmt(r) for r in cells[1:]])
