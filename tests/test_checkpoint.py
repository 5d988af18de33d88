"""patchnet.checkpoint: the typed checkpoint, its save and load, the data fingerprint a resumed run is checked
against, the run folder's lock and clearing; and the hooks a user passes to training."""

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import patchnet
from patchnet.checkpoint import (
    FORMAT,
    Checkpoint,
    CheckpointError,
    CheckpointSaveError,
    DataFingerprint,
    RunFolderBusy,
    check_compatible,
    clear_run,
    load_checkpoint,
    save_checkpoint,
)
from patchnet.cli import app
from patchnet.recipe import save_recipe
from patchnet.training.hooks import HookBase, HookError
from patchnet.training.trainer import train

from conftest import VocWriter, tiny_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _small(**kw) -> Checkpoint:
    return Checkpoint({"w": torch.ones(2)}, {"backbone": {"name": "x"}}, ["a"], 4, **kw)


def test_checkpoints_are_written_atomically_and_loaded_back_typed(tmp_path):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(_small(history=[{"loss": 1.0}]), path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left
    back = load_checkpoint(path)
    assert torch.equal(back.head["w"], torch.ones(2)) and back.classes == ["a"] and back.feature_dim == 4
    assert back.history == [{"loss": 1.0}] and back.training is None and back.version == FORMAT
    assert torch.load(path, weights_only=True)["format"] == FORMAT  # a plain dict on disk


def test_an_old_checkpoint_without_a_format_loads_and_the_shipped_model_too(tmp_path):
    old = {"head": {"w": torch.ones(2)}, "recipe": {}, "classes": ["a"], "feature_dim": 4, "calibration": None}
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").version == 1
    shipped = load_checkpoint("voc07")
    assert shipped.version == 1 and len(shipped.classes) == 20 and shipped.fusion and shipped.calibration


def _damaged(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not usable checkpoints, each with what its error must say."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    files = {}

    def put(name, value, says):
        torch.save(value, tmp_path / name)
        files[name] = (tmp_path / name, says)

    put("evil.pt", {"head": Evil()}, "evil.pt: not a readable patchnet checkpoint")
    put("list.pt", [1, 2], "list.pt: not a patchnet checkpoint (it holds a list, not a dict)")
    put("other.pt", {"something": 1}, "other.pt: not a patchnet checkpoint (missing head, recipe, classes")
    good = _small().to_dict()
    headless = {k: v for k, v in good.items() if k != "head"}
    put("nohead.pt", headless, "nohead.pt: not a patchnet checkpoint (missing head)")
    put("dim.pt", {**good, "feature_dim": "4"}, "dim.pt: field 'feature_dim' should be int, not str")
    put("classes.pt", {**good, "classes": [1, 2]}, "classes.pt: field 'classes' should hold class names")
    put("weights.pt", {**good, "head": {"w": [1.0]}}, "weights.pt: field 'head' holds 'w', which is not a tensor")
    put("newer.pt", {**good, "format": FORMAT + 1}, f"newer.pt: written in checkpoint format {FORMAT + 1}")
    put("half.pt", {**good, "epoch": 1}, "half.pt: a damaged checkpoint (missing optimizer")
    save_checkpoint(_small(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    files["truncated.pt"] = (tmp_path / "truncated.pt", "truncated.pt: not a readable patchnet checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    files["text.pt"] = (tmp_path / "text.pt", "text.pt: not a readable patchnet checkpoint")
    return files


def test_a_damaged_foreign_or_newer_file_is_one_error_naming_the_file_and_the_field(tmp_path):
    for name, (path, says) in _damaged(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert says in str(e.value), name
        with pytest.raises(CheckpointError, match=name):  # through the API
            patchnet.load(path, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_eval_of_a_damaged_checkpoint_is_one_line_not_a_traceback(tmp_path):
    for name, (path, says) in _damaged(tmp_path).items():
        result = runner.invoke(app, ["eval", "-c", str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output, name
        assert says in result.output and result.output.count("\n") == 1, result.output


def test_checkpoint_from_another_backbone_or_class_list_is_refused():
    ckpt = Checkpoint({}, {"backbone": {"name": "efficientnet_lite0"}}, ["cat", "dog"], 1280)
    check_compatible(ckpt, "x.pt", "efficientnet_lite0", ["cat", "dog"], 1280)
    with pytest.raises(CheckpointError, match="trained on backbone efficientnet_lite0 .* uses resnet50"):
        check_compatible(ckpt, "x.pt", "resnet50", ["cat", "dog"], 2048)
    with pytest.raises(CheckpointError, match=r"trained for classes \['cat', 'dog'\]"):
        check_compatible(ckpt, "x.pt", "efficientnet_lite0", ["cat", "cow"], 1280)


# --------------------------------------------------------------------------- the data fingerprint


def _records(folder: Path, names) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        if not (folder / f"{n}.jpg").exists():  # as they were: the same size and modification time
            (folder / f"{n}.jpg").write_bytes(b"x" * (len(n) + 1))
        out.append(SimpleNamespace(image_id=n, path=folder / f"{n}.jpg"))
    return out


def test_the_fingerprint_names_images_added_removed_changed_classes_world_and_a_moved_root(tmp_path, monkeypatch):
    then = DataFingerprint.of(str(tmp_path / "d"), _records(tmp_path / "d", "abc"), ["cat"], 1)
    assert then.changes(DataFingerprint.of(str(tmp_path / "d"), _records(tmp_path / "d", "abc"), ["cat"], 1)) == []
    records = _records(tmp_path / "d", ["a", "b", "x", "y"])
    (tmp_path / "d" / "a.jpg").write_bytes(b"longer than before")
    text = "; ".join(then.changes(DataFingerprint.of(str(tmp_path / "d"), records, ["cat", "dog"], 2)))
    assert "2 training images added (e.g. 'x', 'y')" in text and "1 training image removed (e.g. 'c')" in text
    assert "1 training image changed" in text and "'a'" in text and "new: ['dog']" in text
    assert "1 training process then, 2 now" in text
    # a relative data.root that now points to another folder, from another working folder
    monkeypatch.chdir(tmp_path)
    relative = DataFingerprint.of("d", _records(tmp_path / "d", "abc"), ["cat"], 1)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    now = DataFingerprint.of("d", _records(tmp_path / "elsewhere" / "d", "ab"), ["cat"], 1)
    text = "; ".join(relative.changes(now))
    assert "1 training image removed" in text and "data.root 'd' (relative" in text
    assert str(tmp_path / "elsewhere" / "d") in text and str(tmp_path / "d") in text


def test_resume_after_images_were_added_is_refused_with_their_count(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    assert load_checkpoint(recipe.run_dir / "last.pt").data.images.keys() == {"a", "b", "c", "d"}
    voc = VocWriter(small_voc)
    voc.add("g", 90, 70, [("cat", 5, 5, 50, 50)], seed=9)
    voc.add("h", 90, 70, [("dog", 5, 5, 50, 50)], seed=10)
    voc.split("train", ["a", "b", "c", "d", "g", "h"])
    result = runner.invoke(app, ["train", "--recipe", str(recipe.run_dir / "recipe.yaml"), "--resume", "--epochs", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "the data changed since" in result.output and "2 training images added (e.g. 'g', 'h')" in result.output
    assert "--overwrite" in result.output
    assert load_checkpoint(recipe.run_dir / "last.pt").training["epoch"] == 1  # untouched
    voc.split("train", ["a", "b", "c", "d"])  # as it was: resuming goes on
    assert train(tiny_recipe(tmp_path, small_voc, "train.epochs=2"), resume=True, progress=False).epochs == 2


# --------------------------------------------------------------------------- the run folder


def test_overwrite_clears_the_earlier_runs_files_first_and_only_those(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    run = recipe.run_dir
    (run / "eval_val.csv").write_text("old table")
    (run / "notes.txt").write_text("the user's own file")
    seen = {}

    class Look(HookBase):
        def before_train(self, state):
            seen["files"] = sorted(p.name for p in run.iterdir() if p.is_file())
            seen["events"] = len(list((run / "tensorboard").glob("events.out.tfevents.*")))

    result = patchnet.train(recipe=_recipe_file(recipe, tmp_path), overwrite=True, progress=False, hooks=[Look()])
    assert seen["files"] == [".lock", "notes.txt", "recipe.yaml"] and seen["events"] == 1  # this run's own
    assert result.best.is_file() and (run / "notes.txt").read_text() == "the user's own file"
    assert clear_run(tmp_path / "nothing") == []


def _recipe_file(recipe, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    save_recipe(recipe, path)
    return path


def test_a_second_run_on_a_locked_folder_is_refused_at_once_naming_the_holder(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    code = (
        "import sys, time\nfrom patchnet.files import file_lock\n"
        "with file_lock(sys.argv[1], 'a run'):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(recipe.run_dir / ".lock")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"another run is training in this folder \\(pid {holder.pid}\\)"):
            train(recipe, progress=False)
        result = runner.invoke(app, ["train", "--recipe", str(_recipe_file(recipe, tmp_path))])
        assert result.exit_code == 2 and f"(pid {holder.pid})" in result.output and "Traceback" not in result.output
    finally:
        holder.kill()
        holder.wait()
    assert train(recipe, progress=False).epochs == 1  # released with its holder


def test_a_full_disk_on_save_is_one_error_and_the_previous_checkpoint_loads(tmp_path, small_voc, monkeypatch):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    before = load_checkpoint(recipe.run_dir / "last.pt")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    result = runner.invoke(app, ["train", "--recipe", str(recipe.run_dir / "recipe.yaml"), "--resume", "--epochs", "2"])
    monkeypatch.undo()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{recipe.run_dir}: could not write" in result.output and "the disk is full" in result.output
    assert "is intact" in result.output and "--resume" in result.output
    after = load_checkpoint(recipe.run_dir / "last.pt")
    assert after.training["epoch"] == 1 and torch.equal(after.head["fca.0.weight"], before.head["fca.0.weight"])
    # no temporary file left
    assert sorted(p.name for p in recipe.run_dir.iterdir() if ".pt" in p.name) == ["best.pt", "last.pt"]
    with pytest.raises(CheckpointSaveError, match="could not write x.pt .*; no earlier x.pt was there"):
        monkeypatch.setattr(torch, "save", full_disk)
        save_checkpoint(_small(), tmp_path / "x.pt")


# --------------------------------------------------------------------------- hooks


class Recorder(HookBase):
    """Records every call the trainer makes."""

    def __init__(self):
        self.calls, self.steps = [], []

    def before_train(self, state):
        self.calls.append("before_train")

    def after_step(self, state):
        self.steps.append((state.epoch, state.step))

    def before_commit(self, state, end):
        end.record["mine"] = float(end.record["epoch"])  # saved with the history

    def after_epoch(self, state, end):
        self.calls.append(f"after_epoch {end.record['epoch']}")

    def after_train(self, state):
        self.calls.append("after_train")


def test_a_users_hook_passed_in_is_called_around_steps_and_epochs(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc)
    hook = Recorder()
    train(recipe, progress=False, hooks=[hook])
    assert hook.calls == ["before_train", "after_epoch 1", "after_epoch 2", "after_train"]
    per_epoch = [[s for e, s in hook.steps if e == epoch] for epoch in (0, 1)]
    assert per_epoch[0] and all(steps == list(range(1, len(steps) + 1)) for steps in per_epoch)
    assert [r["mine"] for r in load_checkpoint(recipe.run_dir / "last.pt").history] == [1.0, 2.0]
    with pytest.raises(HookError, match="is not a patchnet.training.hooks.HookBase"):
        train(tiny_recipe(tmp_path / "b", small_voc), progress=False, hooks=[object()])
