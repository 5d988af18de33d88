import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

import patchnet.train as train_module
from conftest import tiny_recipe
from patchnet.cli import app
from patchnet.model import CheckpointError, load_checkpoint
from patchnet.recipe import recipe_from_dict
from patchnet.train import LRSchedule, TrainingError, epoch_indices, train


def _heads_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_training_writes_checkpoints_recipe_and_logs(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc)
    result = train(recipe, progress=False)
    run = recipe.run_dir
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file() and (run / "recipe.yaml").is_file()
    assert any((run / "tensorboard").iterdir())
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert state["history"][-1]["loss"] > 0 and 0 <= result.best_map07 <= 1
    assert set(state["history"][-1]) >= {"loss", "patch_acc", "lr", "map07", "map"}
    assert result.table is not None and result.table.classes == ["cat", "dog", "person"]


def test_trunk_parameters_and_batchnorm_statistics_never_change(tmp_path, small_voc, monkeypatch):
    built = []
    original = train_module.build_backbone

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_backbone", spy)
    recipe = tiny_recipe(tmp_path, small_voc)
    torch.manual_seed(0)
    reference = original(recipe.backbone.name, recipe.backbone.weights, recipe.backbone.input_size).state_dict()
    train(recipe, progress=False)
    (backbone,) = built
    after = backbone.state_dict()
    assert any("running_mean" in k for k in after)
    for k, v in reference.items():
        assert torch.equal(v, after[k]), k


def test_same_seed_same_head(tmp_path, small_voc):
    a = train(tiny_recipe(tmp_path / "a", small_voc, "cache.dir=" + str(tmp_path / "c")), progress=False)
    b = train(tiny_recipe(tmp_path / "b", small_voc, "cache.dir=" + str(tmp_path / "c")), progress=False)
    assert _heads_equal(load_checkpoint(a.run_dir / "last.pt")["head"], load_checkpoint(b.run_dir / "last.pt")["head"])


class Killed(Exception):
    """Stands for SIGKILL: nothing in the trainer catches it."""


def test_resume_after_a_kill_between_epochs_continues_exactly(tmp_path, small_voc, monkeypatch):
    cache = "cache.dir=" + str(tmp_path / "c")
    straight = train(tiny_recipe(tmp_path / "a", small_voc, cache, "train.epochs=3"), progress=False)
    real_save = train_module.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    recipe = tiny_recipe(tmp_path / "b", small_voc, cache, "train.epochs=3")
    with pytest.raises(Killed):
        train(recipe, progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = train(recipe, resume=True, progress=False)
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert _heads_equal(a["head"], b["head"])
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in (a["history"], b["history"])]
    assert untimed[0] == untimed[1]


def test_a_finished_run_can_be_extended(tmp_path, small_voc):
    train(tiny_recipe(tmp_path, small_voc, "train.epochs=1"), progress=False)
    longer = train(tiny_recipe(tmp_path, small_voc, "train.epochs=2"), resume=True, progress=False)
    assert longer.epochs == 2 and len(load_checkpoint(longer.run_dir / "last.pt")["history"]) == 2


def test_resume_after_ctrl_c_mid_epoch_continues_exactly(tmp_path, small_voc, monkeypatch):
    cache = "cache.dir=" + str(tmp_path / "c")
    straight = train(tiny_recipe(tmp_path / "a", small_voc, cache), progress=False)
    calls = {"n": 0}
    real_ce = train_module.F.cross_entropy

    def interrupt_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_ce(*args, **kwargs)

    monkeypatch.setattr(train_module.F, "cross_entropy", interrupt_at_step_5)
    recipe = tiny_recipe(tmp_path / "b", small_voc, cache)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    saved = load_checkpoint(recipe.run_dir / "last.pt")
    assert saved["step"] > 0  # saved mid-epoch, with the batches already done
    monkeypatch.setattr(train_module.F, "cross_entropy", real_ce)
    resumed = train(recipe, resume=True, progress=False)
    assert _heads_equal(load_checkpoint(straight.run_dir / "last.pt")["head"],
                        load_checkpoint(resumed.run_dir / "last.pt")["head"])


def test_nan_loss_stops_with_the_facts_and_keeps_last_pt(tmp_path, small_voc, monkeypatch):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    before = (recipe.run_dir / "last.pt").read_bytes()
    real_ce = train_module.F.cross_entropy
    monkeypatch.setattr(train_module.F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 1 \(lr 0.001\); last batch: features mean"):
        train(tiny_recipe(tmp_path, small_voc, "train.epochs=2"), resume=True, progress=False)
    assert (recipe.run_dir / "last.pt").read_bytes() == before


def test_resume_refuses_a_changed_recipe(tmp_path, small_voc):
    train(tiny_recipe(tmp_path, small_voc, "train.epochs=1"), progress=False)
    with pytest.raises(CheckpointError, match="made with another recipe"):
        train(tiny_recipe(tmp_path, small_voc, "train.lr=0.5"), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_recipe(tmp_path, small_voc, "name=other"), resume=True, progress=False)


def test_epoch_indices_keep_every_positive_and_redraw_background():
    labels = np.array([0] * 10 + [1] * 5 + [3] * 1000 + [-1] * 20)
    a = epoch_indices(labels, 3, 0.1, seed=0, epoch=0)
    b = epoch_indices(labels, 3, 0.1, seed=0, epoch=1)
    assert set(range(15)) <= set(a.tolist()) and set(range(15)) <= set(b.tolist())
    assert not set(range(1015, 1035)) & set(a.tolist())  # ignored patches never train
    assert 60 <= (labels[a] == 3).sum() <= 140
    assert set(a.tolist()) != set(b.tolist())
    np.testing.assert_array_equal(a, epoch_indices(labels, 3, 0.1, seed=0, epoch=0))


def _schedule(**train):
    recipe = recipe_from_dict({"train": train})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr)
    return opt, LRSchedule(opt, recipe)


def test_step_schedule_divides_by_ten_at_the_milestones():
    opt, sched = _schedule(epochs=8, milestones=[0.5, 0.75])
    lrs = []
    for e in range(1, 9):
        sched.step(e, 1.0)
        lrs.append(opt.param_groups[0]["lr"])
    np.testing.assert_allclose(lrs, [0.01] * 3 + [0.001] * 2 + [0.0001] * 3)


def test_plateau_schedule_decays_three_times_then_stops():
    opt, sched = _schedule(schedule="plateau", plateau_patience=1, max_decays=3, epochs=100)
    keep = [sched.step(e, 1.0) for e in range(1, 20)]  # a flat loss plateaus every other epoch
    assert sched.decays == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert keep.index(False) > 0 and not keep[-1]


runner = CliRunner()


def test_eval_and_predict_commands(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc)
    train(recipe, progress=False)
    ckpt = recipe.run_dir / "best.pt"
    result = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--split", "val", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "AP07" in result.output and "mAP" in result.output
    table = json.loads((tmp_path / "ev" / "eval_val.json").read_text())
    assert set(table["classes"]) == {"cat", "dog", "person"}
    assert (tmp_path / "ev" / "eval_val.csv").read_text().startswith("class,ap07,ap")
    img = small_voc / "JPEGImages" / "a.jpg"
    result = runner.invoke(app, ["predict", "--checkpoint", str(ckpt), str(img), "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "p.json").read_text())[str(img)]
    assert set(scores) == {"cat", "dog", "person"} and all(0 <= v <= 1 for v in scores.values())


def test_eval_refuses_a_dataset_with_other_classes(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    from patchnet.infer import evaluate_split

    state = load_checkpoint(recipe.run_dir / "best.pt")
    state["classes"] = ["cat", "dog", "horse"]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"trained for classes \['cat', 'dog', 'horse'\]"):
        evaluate_split(tmp_path / "other.pt", split="val", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp_path, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    recipe = tiny_recipe(tmp_path, root, "head.dropout=0.0")
    train(recipe, progress=False)
    torch.save({"rank": rank}, out / f"done{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_on_cpu_with_gloo_two_processes(tmp_path, small_voc):
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, tmp_path, small_voc, tmp_path), nprocs=2, join=True)
    assert (tmp_path / "done0.pt").is_file() and (tmp_path / "done1.pt").is_file()
    state = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert state["epoch"] == 2 and "map07" in state["history"][-1]
    # the same global batches on one process give the same head (dropout off), up to summation order
    single = train(tiny_recipe(tmp_path / "single", small_voc, "head.dropout=0.0",
                               "cache.dir=" + str(tmp_path / "cache")), progress=False)
    ref = load_checkpoint(single.run_dir / "last.pt")["head"]
    for k in ref:
        assert torch.allclose(ref[k], state["head"][k], atol=1e-5), k
