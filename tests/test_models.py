"""The models that ship with patchnet (patchnet.models): found by name, slim, and scoring as the API does."""

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

import patchnet
from patchnet.checkpoint import load_checkpoint
from patchnet.cli import app
from patchnet.cli.common import table_folder
from patchnet.models import DEFAULT, SHIPPED, is_shipped, resolve_checkpoint, shipped_path
from patchnet.recipe import VOC_CLASSES

from conftest import write_image


def test_every_shipped_model_is_in_the_package_and_slim():
    assert DEFAULT in SHIPPED
    for name in SHIPPED:
        path = shipped_path(name)
        assert path.is_file() and path.stat().st_size < 8e6
        state = load_checkpoint(name)  # by name
        assert state.training is None and not state.history  # nothing only resuming needs
        assert {v.dtype for v in state.head.values()} == {torch.float16}
        assert state.card["name"] == name and state.card["commit"]
        assert state.fusion is not None and state.calibration is not None


def test_the_shipped_voc_model_predicts_by_name():
    model = patchnet.load("voc07")
    assert model.classes == VOC_CLASSES
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    p = model.predict(image)
    assert p.probabilities is not None and ((p.probabilities >= 0) & (p.probabilities <= 1)).all()
    assert next(model.predictor.head.parameters()).dtype == torch.float32  # fp16 on disk, fp32 to compute


def test_names_resolve_to_the_package_and_files_win(tmp_path, monkeypatch):
    assert is_shipped(resolve_checkpoint("voc07"))
    monkeypatch.chdir(tmp_path)
    Path("voc07").write_bytes(b"not a checkpoint")  # a file of that name is the user's
    assert resolve_checkpoint("voc07") == Path("voc07")
    assert table_folder(Path("voc07")) == Path(".")
    Path("voc07").unlink()
    assert table_folder(Path("voc07")) == Path("checkpoints") / "voc07"  # never inside the installed package


def test_predict_with_the_shipped_model_writes_nothing_into_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in shipped_path("voc07").parent.iterdir())
    write_image(tmp_path / "x.jpg", 64, 48)
    result = CliRunner().invoke(app, ["predict", "x.jpg", "--checkpoint", "voc07"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in shipped_path("voc07").parent.iterdir()) == before
