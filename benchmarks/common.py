"""Shared set-up of the benchmarks: the real VOC2007 images in ../shared/data, the command line, timing, tables."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from patchnet.dist import native_bf16

REPO = Path(__file__).resolve().parent.parent
VOC = REPO.parent / "shared" / "data" / "VOCdevkit" / "VOC2007"
DEV_RECIPE = REPO / "recipes" / "voc07_dev.yaml"


def require_voc(root: Path | str = VOC) -> Path:
    root = Path(root)
    if not (root / "ImageSets" / "Main" / "devval.txt").is_file():
        raise SystemExit(
            f"benchmark data not found at {root}: the benchmarks run on the VOC2007 images of "
            "../shared/data (pass --voc /path/to/VOCdevkit/VOC2007)"
        )
    return root


def bench_parser(
    doc: str | None,
    *,
    voc: bool = True,
    recipe: Path | str | None = DEV_RECIPE,
    sets: bool = True,
    limit: int | None = None,
    limit_help: str = "first N images of each split (0: all)",
) -> argparse.ArgumentParser:
    """The command line every benchmark starts with; its description is the module docstring ``doc``.

    - ``--voc``: the VOC2007 root (default ../shared/data/VOCdevkit/VOC2007); left out with ``voc=False``;
    - ``--recipe``: the recipe, by default ``recipe`` (the dev recipe); left out with ``recipe=None``;
    - ``--set``: extra recipe overrides, applied after the benchmark's own; left out with ``sets=False``;
    - ``--limit``, only when ``limit`` is given (its default): the first N images of the splits.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if voc:
        ap.add_argument("--voc", default=str(VOC), help="the VOC2007 root with the devtrain and devval lists")
    if recipe is not None:
        ap.add_argument("--recipe", default=str(recipe), help="the recipe (default: %(default)s)")
    if sets:
        ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides (section.field=value)")
    if limit is not None:
        ap.add_argument("--limit", type=int, default=limit, help=limit_help)
    return ap


def dev_recipe(args: argparse.Namespace, *overrides: str, after: tuple[str, ...] | list[str] = ()):
    """``args.recipe`` with data.root set to ``args.voc``, then ``overrides``, the --set overrides of
    ``args.set`` and last ``after`` (the benchmark's settings that --set must not change)."""
    from patchnet.recipe import load_recipe

    return load_recipe(args.recipe, [f"data.root={require_voc(args.voc)}", *overrides, *args.set, *after])


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 (timings differ about 2x between the two kinds)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({'native bf16' if native_bf16() else 'no native bf16: fp32 trunk'})"


def machine() -> str:
    threads = torch.get_num_threads()
    cpu = cpu_name()
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
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"
    return "\n".join([fmt(cells[0]), "| " + " | ".join("-" * w for w in width) + " |"] + [fmt(r) for r in cells[1:]])
