"""``patchnet train <folder>`` with no recipe, end to end on every layout people have (tiny generated data)."""

from pathlib import Path

import pytest
import yaml
from test_detect import csv_lists, image_folder, roboflow, voc_devkit
from typer.testing import CliRunner

from patchnet.cli import app

runner = CliRunner()

LAYOUTS = {
    "imagefolder": (lambda r: image_folder(r, {"train": 4, "val": 2}), "val", True),
    "class_folders": (lambda r: image_folder(r, {".": 6}), "val", True),
    "roboflow": (lambda r: roboflow(r, n=6), "valid", True),  # one box per image: single-label
    "voc_devkit": (voc_devkit, "val", True),
    "csv": (lambda r: csv_lists(r, n=6), "val", False),
}


def tiny(tmp_path: Path) -> list[str]:
    """What keeps a run to seconds: a small trunk input, two scales, a small head, one epoch."""
    settings = [
        "backbone.input_size=32",
        "backbone.precision=fp32",
        "train.precision=fp32",
        "patches.scales=[1.0, 2.0]",
        "patches.levels=[]",
        "patches.step=0.5",
        "head.hidden=16",
        f"runtime.cache_dir={tmp_path / 'cache'}",
        "runtime.workers=0",
    ]
    return [arg for s in settings for arg in ("--set", s)]


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_train_on_a_folder_with_no_other_argument(tmp_path, kind):
    make, val, single = LAYOUTS[kind]
    root = tmp_path / "my data"
    root.mkdir()
    make(root)
    out = tmp_path / "runs"
    args = ["train", str(root), "--out", str(out), "--epochs", "1", "--backbone", "efficientnet_lite0"]
    result = runner.invoke(app, [*args, "--device", "cpu", *tiny(tmp_path)])
    assert result.exit_code == 0, result.output
    text = result.output
    # the table printed before any work, then what came out and where
    for word in ("data ", "split ", "classes ", "supervision ", "run ", "backbone ", "efficientnet_lite0"):
        assert word in text
    runs = list(out.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("my_data")
    run = runs[0]
    assert (run / "last.pt").is_file() and (run / f"eval_{val}.csv").is_file()
    assert f"try it: patchnet predict --checkpoint {run}" in text
    assert (f"{val}: top-1 accuracy" in text) == single
    assert (run / f"confusion_{val}.png").is_file() == single
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["data"]["classes"] and saved["data"]["classes"] != [], "the classes the run really used"
    assert "Traceback" not in text


def test_resume_of_a_folder_run_with_classes_found(tmp_path):
    root = image_folder(tmp_path / "pets", {"train": 3, "val": 1})
    args = ["train", str(root), "--out", str(tmp_path / "runs"), "--epochs", "1", "--backbone", "efficientnet_lite0"]
    assert runner.invoke(app, [*args, *tiny(tmp_path)]).exit_code == 0
    again = runner.invoke(app, [*args, *tiny(tmp_path)])
    assert again.exit_code == 2 and "--resume" in again.output and "--name" in again.output
    longer = [a if a != "1" else "2" for a in args]
    resumed = runner.invoke(app, [*longer, "--resume", *tiny(tmp_path)])
    assert resumed.exit_code == 0, resumed.output
    assert "2 epochs" in resumed.output


def test_bad_folders_get_one_line(tmp_path):
    for args in (["train", str(tmp_path / "missing")], ["train"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.startswith("error: ")
        assert "Traceback" not in result.output


def test_python_train_on_a_folder(tmp_path):
    import patchnet
    from patchnet.checkpoint import CheckpointError

    root = image_folder(tmp_path / "pets", {".": 4})
    sets = [a for a in tiny(tmp_path) if a != "--set"]
    run = patchnet.train(root, epochs=1, backbone="efficientnet_lite0", out=tmp_path / "runs", overrides=sets)
    assert run.run_dir == tmp_path / "runs" / "pets" and run.best.is_file() and run.last.is_file()
    assert run.table is not None and run.table.top1 is not None and run.confusion is not None
    assert run.confusion.sum() == len(run.table.classes)  # one val image per class (10% of 4, at least one)
    with pytest.raises(CheckpointError, match="already holds a run"):
        patchnet.train(root, epochs=1, out=tmp_path / "runs", overrides=sets)
    model = patchnet.load(run.best)
    assert model.classes == ["cat", "dog"]
