"""The README's commands run as written: every `patchnet ...` line of its bash blocks, in order, and its Python
block, in a folder holding what they name (photos/, photo.jpg, data/VOCdevkit/VOC2007) as tiny generated data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchnet.cli import app
from patchnet.recipe import VOC_CLASSES

from conftest import VocWriter, write_image

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[list[str]]:
    """The `patchnet` lines of the README's bash blocks as argument lists (comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            if line.startswith("patchnet "):
                out.append(shlex.split(line, comments=True)[1:])
    return out


def tiny_world(root: Path) -> None:
    """What the README's commands name: photos/ (a folder per class), photo.jpg, a VOC devkit, recipes/."""
    for c, name in enumerate(("cat", "dog")):
        for i in range(6):
            write_image(root / "photos" / name / f"{name}{i}.jpg", 72 + 4 * i, 56, seed=10 * c + i)
    write_image(root / "photo.jpg", 80, 60, seed=99)
    w = VocWriter(root / "data" / "VOCdevkit" / "VOC2007", classes=VOC_CLASSES)
    ids = [f"{i:06d}" for i in range(12)]
    for n, i in enumerate(ids):
        w.add(i, 80, 60, [(VOC_CLASSES[n % 3], 5, 5, 50, 45)], seed=n)
    for split, part in (("train", ids[:5]), ("val", ids[5:8]), ("trainval", ids[:8]), ("test", ids[8:])):
        w.split(split, part)
    (root / "recipes").symlink_to(REPO / "recipes")


def test_the_readme_shows_commands_of_every_kind():
    names = {c[0] for c in commands()}
    assert {"train", "predict", "eval", "inspect"} <= names
    assert any(c[:1] == ["predict"] and "--checkpoint" not in c for c in commands()), "the shipped model"


@pytest.mark.slow
def test_the_readme_commands_run_as_written(tmp_path, monkeypatch):
    tiny_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in commands():
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"patchnet {' '.join(args)}:\n{result.output[-3000:]}"
    (python,) = blocks("python")
    exec(compile(python, "README.md", "exec"), {})  # the Python block, as a user pastes it
