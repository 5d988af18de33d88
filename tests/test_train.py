import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

import patchnet.head.losses as losses_module
import patchnet.training.hooks as hooks_module
import patchnet.training.trainer as train_module
from patchnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchnet.cli import app
from patchnet.data import DatasetError
from patchnet.patches.labels import MULTI
from patchnet.recipe import recipe_from_dict, save_recipe
from patchnet.training.state import LRSchedule
from patchnet.training.trainer import TrainingError, epoch_indices, train

from conftest import tiny_recipe


def _heads_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_training_writes_checkpoints_recipe_and_logs(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc)
    result = train(recipe, progress=False)
    run = recipe.run_dir
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file() and (run / "recipe.yaml").is_file()
    assert any((run / "tensorboard").iterdir())
    state = load_checkpoint(run / "last.pt")
    assert state.training["epoch"] == 2 and len(state.history) == 2
    assert state.history[-1]["loss"] > 0 and 0 <= result.best_map07 <= 1
    assert set(state.history[-1]) >= {"loss", "patch_acc", "lr", "select_map07", "select_map"}
    assert result.table is not None and result.table.classes == ["cat", "dog", "person"]


def test_the_trunk_that_runs_never_changes(tmp_path, small_voc, monkeypatch):
    """The extractor runs a fused copy of the backbone: check that copy, before and after training."""
    built = []
    original = train_module.build_extractor

    def spy(recipe):
        built.append(original(recipe))
        built.append({k: v.clone() for k, v in built[0].backbone.state_dict().items()})
        return built[0]

    monkeypatch.setattr(train_module, "build_extractor", spy)
    recipe = tiny_recipe(tmp_path, small_voc, "train.supervision=both", "pool.name=topk", "train.image_batch=2")
    train(recipe, progress=False)
    extractor, before = built
    trunk = extractor.backbone
    assert not trunk.training and all(not m.training for m in trunk.modules())
    assert not any(p.requires_grad for p in trunk.parameters())
    after = trunk.state_dict()
    assert before.keys() == after.keys() and len(after) > 10
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_same_seed_same_head(tmp_path, small_voc):
    a = train(tiny_recipe(tmp_path / "a", small_voc, "runtime.cache_dir=" + str(tmp_path / "c")), progress=False)
    b = train(tiny_recipe(tmp_path / "b", small_voc, "runtime.cache_dir=" + str(tmp_path / "c")), progress=False)
    assert _heads_equal(load_checkpoint(a.run_dir / "last.pt").head, load_checkpoint(b.run_dir / "last.pt").head)


class Killed(Exception):
    """Stands for SIGKILL: nothing in the trainer catches it."""


def _straight_and_killed_after_epoch_1(tmp_path, root, monkeypatch, *args):
    """last.pt of an uninterrupted run, and of the same run killed after epoch 1 and resumed."""
    straight = train(tiny_recipe(tmp_path / "a", root, *args), progress=False)
    real_save = hooks_module.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state.training["epoch"] == 1:
            raise Killed

    monkeypatch.setattr(hooks_module, "save_checkpoint", save_then_die)
    recipe = tiny_recipe(tmp_path / "b", root, *args)
    with pytest.raises(Killed):
        train(recipe, progress=False)
    monkeypatch.setattr(hooks_module, "save_checkpoint", real_save)
    resumed = train(recipe, resume=True, progress=False)
    return load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")


def test_resume_after_a_kill_between_epochs_continues_exactly(tmp_path, small_voc, monkeypatch):
    a, b = _straight_and_killed_after_epoch_1(
        tmp_path, small_voc, monkeypatch, "runtime.cache_dir=" + str(tmp_path / "c"), "train.epochs=3"
    )
    assert _heads_equal(a.head, b.head)
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in (a.history, b.history)]
    assert untimed[0] == untimed[1]


def test_a_finished_run_can_be_extended(tmp_path, small_voc):
    train(tiny_recipe(tmp_path, small_voc, "train.epochs=1"), progress=False)
    longer = train(tiny_recipe(tmp_path, small_voc, "train.epochs=2"), resume=True, progress=False)
    assert longer.epochs == 2 and len(load_checkpoint(longer.run_dir / "last.pt").history) == 2


def _interrupt_then_resume(monkeypatch, recipe, owner, name: str, at_call: int):
    """Ctrl-C on the ``at_call``-th call of ``owner.name`` during training, then resume without it.

    Returns last.pt as the interrupt left it, and the resumed run's result.
    """
    real, calls = getattr(owner, name), {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    saved = load_checkpoint(recipe.run_dir / "last.pt")
    monkeypatch.setattr(owner, name, real)
    return saved, train(recipe, resume=True, progress=False)


def test_resume_after_ctrl_c_mid_epoch_continues_exactly(tmp_path, small_voc, monkeypatch):
    cache = "runtime.cache_dir=" + str(tmp_path / "c")
    straight = train(tiny_recipe(tmp_path / "a", small_voc, cache), progress=False)
    saved, resumed = _interrupt_then_resume(
        monkeypatch, tiny_recipe(tmp_path / "b", small_voc, cache), losses_module.F, "cross_entropy", 5
    )
    assert saved.training["step"] > 0  # saved mid-epoch, with the batches already done
    assert _heads_equal(
        load_checkpoint(straight.run_dir / "last.pt").head, load_checkpoint(resumed.run_dir / "last.pt").head
    )


@pytest.mark.parametrize(
    "owner, name, at_call",
    [
        (torch.optim.SGD, "step", 7),  # between a parameter update and its step counter
        (LRSchedule, "step", 5),  # between the milestone decay of epoch 5 (an evaluation epoch) and its epoch counter
    ],
)
def test_a_signal_inside_a_commit_waits_for_its_end(tmp_path, small_voc, monkeypatch, owner, name, at_call):
    """A real SIGINT delivered the moment one half of a commit is done; resume still matches a straight run."""
    args = (
        "train.epochs=10",
        "train.eval_every=5",
        "train.milestones=[0.5]",
        "runtime.cache_dir=" + str(tmp_path / "c"),
    )
    straight = train(tiny_recipe(tmp_path / "a", small_voc, *args), progress=False)
    real, calls = getattr(owner, name), {"n": 0}

    def then_signal(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == at_call:
            signal.raise_signal(signal.SIGINT)  # the handler runs at the next bytecode: inside the commit
        return out

    monkeypatch.setattr(owner, name, then_signal)
    # Python's own handler, as in a terminal (a test runner started in the background ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        recipe = tiny_recipe(tmp_path / "b", small_voc, *args)
        with pytest.raises(KeyboardInterrupt):
            train(recipe, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(owner, name, real)
    resumed = train(recipe, resume=True, progress=False)
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert [r["lr"] for r in a.history] == [r["lr"] for r in b.history]
    assert _heads_equal(a.head, b.head)


@pytest.mark.slow  # a subprocess or several processes
def test_sigint_to_a_real_train_process_then_resume_matches_a_straight_run(tmp_path, small_voc):
    """Ctrl-C as a user sends it: SIGINT to a running ``patchnet train``, then ``--resume``."""
    args = (
        "train.epochs=30",
        "train.eval_every=10",
        "train.milestones=[0.5]",
        "runtime.cache_dir=" + str(tmp_path / "c"),
    )
    straight = train(tiny_recipe(tmp_path / "a", small_voc, *args), progress=False)
    recipe = tiny_recipe(tmp_path / "b", small_voc, *args)
    save_recipe(recipe, tmp_path / "recipe.yaml")
    cli = [
        sys.executable,
        "-c",
        "from patchnet.cli import main; main()",
        "train",
        "--recipe",
        str(tmp_path / "recipe.yaml"),
    ]
    # a test runner started in the background ignores SIGINT, and children inherit that: restore it
    proc = subprocess.Popen(
        cli,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:  # the first epoch's log line: training has started
        if line.startswith("INFO: epoch 1:"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "interrupted: saved" in rest and "continue with --resume" in rest
    saved = load_checkpoint(recipe.run_dir / "last.pt")
    assert 1 <= saved.training["epoch"] < 30  # the signal landed mid-run
    resumed = subprocess.run(
        [*cli, "--resume"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(recipe.run_dir / "last.pt")
    assert b.training["epoch"] == 30 and [r["lr"] for r in a.history] == [r["lr"] for r in b.history]
    assert _heads_equal(a.head, b.head)


def test_nan_loss_stops_with_the_facts_and_keeps_last_pt(tmp_path, small_voc, monkeypatch):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    before = (recipe.run_dir / "last.pt").read_bytes()
    real_ce = losses_module.F.cross_entropy
    monkeypatch.setattr(losses_module.F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    with pytest.raises(
        TrainingError, match=r"loss became nan at epoch 2, step 1 \(lr 0.001\); last batch: features mean"
    ):
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
    out = json.loads((tmp_path / "p.json").read_text())
    scores = out["images"][str(img)]
    assert out["pool"] == "power" and set(scores) == {"cat", "dog", "person"}
    assert all(0 <= v["score"] <= 1 and 0 <= v["probability"] <= 1 for v in scores.values())


def test_eval_refuses_a_dataset_with_other_classes(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    from patchnet.evaluation.predictor import evaluate_split

    state = load_checkpoint(recipe.run_dir / "best.pt")
    state.classes = ["cat", "dog", "horse"]
    save_checkpoint(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"trained for classes \['cat', 'dog', 'horse'\]"):
        evaluate_split(tmp_path / "other.pt", split="val", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp_path, root, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    recipe = tiny_recipe(tmp_path, root, "head.dropout=0.0")
    train(recipe, progress=False)
    torch.save({"rank": rank}, out / f"done{rank}.pt")
    torch.distributed.destroy_process_group()


def _ddp_interrupt_worker(rank, world, port, tmp_path, root, mode):
    """One rank of a DDP run: ``straight``, ``interrupt`` (Ctrl-C at the 3rd patch loss) or ``resume``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    recipe = tiny_recipe(
        tmp_path / mode.replace("resume", "interrupt"),
        root,
        "head.dropout=0.0",
        "train.epochs=2",
        "train.supervision=boxes",
        f"runtime.cache_dir={tmp_path / 'cache'}",
    )
    if mode == "interrupt":
        real, calls = losses_module.F.cross_entropy, {"n": 0}

        def interrupting(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        losses_module.F.cross_entropy = interrupting
        with contextlib.suppress(KeyboardInterrupt):
            train(recipe, progress=False)
    else:
        train(recipe, resume=mode == "resume", progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # a subprocess or several processes
def test_ddp_ctrl_c_mid_epoch_keeps_every_ranks_running_loss(tmp_path, small_voc):
    """Bug: a mid-epoch save kept rank 0's running loss only, and every rank restored it."""
    for mode in ("straight", "interrupt", "resume"):
        mp.spawn(_ddp_interrupt_worker, args=(2, _free_port(), tmp_path, small_voc, mode), nprocs=2, join=True)
        if mode == "interrupt":
            saved = load_checkpoint(tmp_path / "interrupt" / "runs" / "tiny" / "last.pt")
            # two steps of epoch 1 done on each rank
            assert saved.training["epoch"] == 0 and saved.training["step"] == 2
            assert (tmp_path / "interrupt" / "runs" / "tiny" / "carry.rank1.json").is_file()
    a = load_checkpoint(tmp_path / "straight" / "runs" / "tiny" / "last.pt")
    b = load_checkpoint(tmp_path / "interrupt" / "runs" / "tiny" / "last.pt")
    assert b.training["epoch"] == 2 and not (tmp_path / "interrupt" / "runs" / "tiny" / "carry.rank1.json").exists()
    # the epoch loss is the mean over both ranks' steps, before and after the interrupt
    assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-6)
    for k in a.head:
        assert torch.allclose(a.head[k], b.head[k], atol=1e-6), k


@pytest.mark.slow  # a subprocess or several processes
def test_ddp_on_cpu_with_gloo_two_processes(tmp_path, small_voc):
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, tmp_path, small_voc, tmp_path), nprocs=2, join=True)
    assert (tmp_path / "done0.pt").is_file() and (tmp_path / "done1.pt").is_file()
    state = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert state.training["epoch"] == 2 and "select_map07" in state.history[-1]
    # the same global batches on one process give the same head (dropout off), up to summation order
    single = train(
        tiny_recipe(tmp_path / "single", small_voc, "head.dropout=0.0", "runtime.cache_dir=" + str(tmp_path / "cache")),
        progress=False,
    )
    ref = load_checkpoint(single.run_dir / "last.pt").head
    for k in ref:
        assert torch.allclose(ref[k], state.head[k], atol=1e-5), k


# --------------------------------------------------------------------------- image-level supervision

from patchnet.head.losses import image_loss, patch_targets  # noqa: E402
from patchnet.training.splits import holdout_records  # noqa: E402


def test_image_loss_leaves_label_zero_out():
    logits = torch.tensor([[2.0, -1.0, 5.0], [0.5, 0.0, -3.0]])
    labels = torch.tensor([[1, -1, 0], [-1, 0, 1]])
    got = image_loss(logits, labels)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    )
    assert torch.allclose(got, want)
    changed = logits.clone()
    changed[0, 2], changed[1, 1] = -40.0, 40.0  # the difficult-only entries: no effect
    assert torch.allclose(image_loss(changed, labels), got)
    assert image_loss(logits, torch.zeros(2, 3, dtype=torch.long)).item() == 0.0
    # sum: each image's known classes summed, averaged over the 2 images (4 known pairs: twice the mean)
    assert torch.allclose(image_loss(logits, labels, "sum"), want * 4 / 2)
    assert torch.allclose(image_loss(changed, labels, "sum"), want * 4 / 2)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        image_loss(logits, labels, "max")


def test_multilabel_patch_targets_spread_over_the_classes():
    t = patch_targets(
        np.array([1, 3, MULTI]),
        np.array([0, 1, 9]),
        np.array([4, 9]),
        np.array([[True, False, True], [False, True, True]]),
        3,
    )
    np.testing.assert_allclose(t.numpy(), [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0.5, 0.5, 0]])


def test_holdout_is_fixed_by_the_seed_and_never_everything():
    a = holdout_records(100, 0.1, 0)
    assert len(a) == 10 and np.array_equal(a, holdout_records(100, 0.1, 0))
    assert not np.array_equal(a, holdout_records(100, 0.1, 1))
    assert len(holdout_records(3, 0.1, 0)) == 1 and len(holdout_records(1, 0.5, 0)) == 0


@pytest.fixture
def boxless_voc(tmp_path):
    """A VOC folder whose XML has no objects: image labels come from the per-class lists only."""
    from conftest import VocWriter

    w = VocWriter(tmp_path / "VOCnobox")
    ids = [f"{i:03d}" for i in range(8)]
    for n, i in enumerate(ids):
        w.add(i, 72 + 8 * (n % 3), 64, [], seed=n)
    labels = {
        "cat": [1, -1, 1, -1, 0, 1, -1, -1],
        "dog": [-1, 1, 1, -1, -1, -1, 1, -1],
        "person": [-1, -1, -1, -1, 1, 1, -1, -1],
    }  # 003 and 007 have no class at all
    w.split("train", ids[:6], {c: v[:6] for c, v in labels.items()})
    w.split("val", ids[6:], {c: v[6:] for c, v in labels.items()})
    return w.root


def test_images_mode_trains_on_a_set_without_any_box(tmp_path, boxless_voc):
    recipe = tiny_recipe(
        tmp_path,
        boxless_voc,
        "train.supervision=images",
        "pool.name=topk",
        "train.image_batch=2",
        "data.boxes=false",
        "train.holdout=0.2",
    )
    result = train(recipe, progress=False)
    state = load_checkpoint(result.run_dir / "last.pt")
    assert state.training["epoch"] == 2 and state.history[-1]["loss"] > 0
    assert result.table is not None and state.calibration["pool"] == "topk"
    # the patch-label path refuses the same data with the fix in the message
    with pytest.raises(DatasetError, match="has no boxes.*train.supervision=images"):
        train(tiny_recipe(tmp_path / "b", boxless_voc), progress=False)


def test_both_mode_adds_the_patch_loss_and_resumes_exactly(tmp_path, small_voc, monkeypatch):
    a, b = _straight_and_killed_after_epoch_1(
        tmp_path,
        small_voc,
        monkeypatch,
        "train.supervision=both",
        "pool.name=lse",
        "train.image_batch=2",
        "train.multilabel=true",
        "train.epochs=3",
        "train.precision=bf16",
        "runtime.cache_dir=" + str(tmp_path / "c"),
    )
    assert _heads_equal(a.head, b.head) and a.history[-1]["patch_acc"] > 0


def test_ctrl_c_during_the_evaluation_of_a_milestone_epoch_keeps_the_decay(tmp_path, small_voc, monkeypatch):
    """Bug: the interrupt used to save epoch E+1 before the schedule stepped, so resume skipped a decay."""
    cache = "runtime.cache_dir=" + str(tmp_path / "c")
    args = ("train.epochs=4", "train.milestones=[0.5]", cache)
    straight = train(tiny_recipe(tmp_path / "a", small_voc, *args), progress=False)
    # the second evaluation is the end of epoch 2, the milestone
    _, resumed = _interrupt_then_resume(
        monkeypatch, tiny_recipe(tmp_path / "b", small_voc, *args), hooks_module, "evaluate", 2
    )
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert [r["lr"] for r in a.history] == [r["lr"] for r in b.history] == [0.01, 0.01, 0.001, 0.001]
    assert _heads_equal(a.head, b.head)


def test_a_checkpoint_of_other_backbone_weights_is_refused(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1")
    train(recipe, progress=False)
    state = load_checkpoint(recipe.run_dir / "last.pt")
    state.weights_id = "efficientnet_lite0:some-other-weights"
    save_checkpoint(state, recipe.run_dir / "last.pt")
    with pytest.raises(CheckpointError, match="weights 'efficientnet_lite0:some-other-weights'"):
        train(tiny_recipe(tmp_path, small_voc, "train.epochs=2"), resume=True, progress=False)


def test_best_is_chosen_on_held_out_training_images_not_on_the_val_split(tmp_path, small_voc, monkeypatch):
    seen = []
    real_evaluate = hooks_module.evaluate

    def spy(head, store, dataset, items, *a, **k):
        seen.append((dataset.name, tuple(items)))
        return real_evaluate(head, store, dataset, items, *a, **k)

    monkeypatch.setattr(hooks_module, "evaluate", spy)  # the selection
    monkeypatch.setattr(train_module, "evaluate", spy)  # the report
    recipe = tiny_recipe(tmp_path, small_voc, "train.holdout=0.25")
    train(recipe, progress=False)
    selection = list(seen[:-1])
    assert selection and all(name.endswith(":train") and len(items) == 1 for name, items in selection)
    assert seen[-1][0].endswith(":val")  # the report, once, at the end
    with pytest.raises(CheckpointError, match="overstates"):
        train(tiny_recipe(tmp_path / "x", small_voc, "data.select_split=val"), progress=False)


def test_fused_checkpoint_scores_through_eval_and_predict(tmp_path, small_voc):
    from patchnet.evaluation.predictor import Predictor, evaluate_split
    from patchnet.evaluation.scoring import InferOptions

    recipe = tiny_recipe(tmp_path, small_voc, "infer.fuse=true", "train.holdout=0.5")
    result = train(recipe, progress=False)
    state = load_checkpoint(result.run_dir / "last.pt")
    assert state.fusion["pool"] == "power" and state.calibration["fused"]
    predictor = Predictor(result.run_dir / "last.pt")
    assert predictor.fusion is not None and predictor.calibration is not None
    table, _n, _ = evaluate_split(result.run_dir / "last.pt", split="val", progress=False)
    np.testing.assert_allclose(table.ap07, result.table.ap07)  # training's report and eval: one path
    p = predictor.predict(small_voc / "JPEGImages" / "e.jpg")
    assert p.probabilities.shape == (3,) and p.present.dtype == bool
    # another pooling than the fused one scores without the fusion and its calibration
    other = Predictor(result.run_dir / "last.pt", InferOptions(pool="max"))
    assert other.fusion is None and other.calibration is None


def test_resume_ignores_the_runtime_section(tmp_path, small_voc):
    train(tiny_recipe(tmp_path, small_voc, "train.epochs=1"), progress=False)
    longer = train(
        tiny_recipe(tmp_path, small_voc, "train.epochs=2", "runtime.heatmaps=0", "runtime.trunk_batch=4"),
        resume=True,
        progress=False,
    )
    assert longer.epochs == 2


def test_augmented_views_of_held_out_images_never_train(tmp_path, small_voc):
    from patchnet.features.build import cache_spec
    from patchnet.features.extract import build_extractor
    from patchnet.training.splits import held_out, prepare_split, selection_split

    recipe = tiny_recipe(tmp_path, small_voc, "aug.views=1", "train.holdout=0.25")
    extractor = build_extractor(recipe)
    spec = cache_spec(recipe, extractor)
    data = prepare_split(recipe, "train", extractor, spec, views=1, progress=False)
    select = selection_split(recipe, data, extractor, spec, False)
    held = held_out(data, select)
    assert held.sum() == 2  # the held-out image and its augmented view
    assert set(data.store.record[held]) == set(data.store.record[select.items])
    assert set(data.store.view[held]) == {0, 1}


@pytest.mark.parametrize("mode", ["exact", "shared"])
def test_a_timm_backbone_trains_and_evaluates(tmp_path, small_voc, mode):
    recipe = tiny_recipe(
        tmp_path,
        small_voc,
        "backbone.name=timm/resnet18",
        "backbone.weights=random",
        f"patches.mode={mode}",
        "train.epochs=1",
    )
    result = train(recipe, progress=False)
    state = load_checkpoint(recipe.run_dir / "last.pt")
    assert state.weights_id == "timm/resnet18:random" and state.history[-1]["loss"] > 0
    assert result.table is not None and result.table.classes == ["cat", "dog", "person"]
    out = runner.invoke(
        app, ["eval", "--checkpoint", str(recipe.run_dir / "best.pt"), "--split", "val", "--out", str(tmp_path / "ev")]
    )
    assert out.exit_code == 0, out.output
    assert set(json.loads((tmp_path / "ev" / "eval_val.json").read_text())["classes"]) == {"cat", "dog", "person"}


@pytest.mark.parametrize("compress", ["pca", "int8"])
def test_a_compressed_cache_trains_and_predict_scores_new_images_as_the_cache_does(tmp_path, small_voc, compress):
    from patchnet.evaluation.predictor import Predictor, evaluate_split

    recipe = tiny_recipe(
        tmp_path,
        small_voc,
        f"cache.compress={compress}",
        "cache.pca_dim=8",
        "train.epochs=1",
        "infer.fuse=true",
        "train.holdout=0.5",
    )
    result = train(recipe, progress=False)
    state = load_checkpoint(result.run_dir / "last.pt")
    dim = 8 if compress == "pca" else 1280
    assert state.head["fca.0.weight"].shape[1] == dim and state.feature_dim == 1280
    assert state.codec["compress"] == compress and ("components" in state.codec) == (compress == "pca")
    table, n, (predictor, dataset, store, items, _) = evaluate_split(
        result.run_dir / "last.pt", split="val", progress=False
    )
    np.testing.assert_allclose(table.ap07, result.table.ap07)  # eval finds the cache that training reported on
    assert store.compress == compress and store.feature_dim == dim and n == 2
    # the fused SVM max-pools features in the trunk's space, also over projections
    assert predictor.fusion is not None and predictor.fusion.coef.shape == (3, 1280)
    # the images scored from the extractor (as `patchnet predict` does with new images), not the cache
    fresh = Predictor(result.run_dir / "last.pt")
    for i in items:
        rec = dataset.records[store.record[i]]
        s = store.item_slice(i)
        cached = predictor.predict_features(store.rows[s], store.patch_boxes[s], rec.width, rec.height)
        direct = fresh.predict(rec.path)
        np.testing.assert_allclose(direct.scores, cached.scores, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(direct.values, cached.values, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a subprocess or several processes
def test_importing_train_loads_no_plotting_and_no_demo_generator():
    code = (
        "import sys, patchnet.training.trainer; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' or m == 'patchnet.data.demo'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.stdout.strip() == "[]"


def test_image_patches_pools_a_fresh_share_of_each_image_and_resumes_exactly(tmp_path, small_voc, monkeypatch):
    pooled_counts, forwarded = [], []
    real_pool, real_forward = train_module.pool, train_module.Trainer._forward

    def spy_pool(values, counts, cfg):
        pooled_counts.append(np.asarray(counts).copy())
        assert len(values) == int(np.sum(counts))  # the pooled rows, image after image
        return real_pool(values, counts, cfg)

    def spy_forward(self, x):
        forwarded.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(train_module, "pool", spy_pool)
    monkeypatch.setattr(train_module.Trainer, "_forward", spy_forward)
    args = ("train.supervision=images", "pool.name=topk", "train.image_batch=2", "train.holdout=0")
    full = train(tiny_recipe(tmp_path / "full", small_voc, *args, "data.val_split="), progress=False)
    all_counts, all_rows = np.concatenate(pooled_counts), sum(forwarded)
    pooled_counts.clear()
    forwarded.clear()
    half = train(
        tiny_recipe(tmp_path / "half", small_voc, *args, "data.val_split=", "train.image_patches=0.5"), progress=False
    )
    counts = np.concatenate(pooled_counts)
    # every image keeps at least one patch and about half of them; alone, the image loss forwards only those
    assert counts.min() >= 1 and (counts <= all_counts).all() and 0.3 < counts.sum() / all_counts.sum() < 0.7
    assert sum(forwarded) == counts.sum() < all_rows
    first, second = np.split(counts, 2)  # two epochs of the same images in another order: fresh draws
    assert first.sum() != second.sum() or not np.array_equal(np.sort(first), np.sort(second))
    heads = [load_checkpoint(r.run_dir / "last.pt").head for r in (full, half)]
    assert not _heads_equal(*heads)
    monkeypatch.undo()
    a, b = _straight_and_killed_after_epoch_1(
        tmp_path / "both",
        small_voc,
        monkeypatch,
        "train.supervision=both",
        "pool.name=topk",
        "train.image_batch=2",
        "train.image_patches=0.5",
        "train.epochs=3",
    )
    assert _heads_equal(a.head, b.head)


def test_an_int8_trunk_trains_and_its_checkpoint_scores_new_images_as_the_cache_does(tmp_path, small_voc):
    from patchnet.evaluation.predictor import Predictor, evaluate_split

    recipe = tiny_recipe(tmp_path, small_voc, "backbone.precision=int8", "backbone.int8_images=2", "train.epochs=1")
    result = train(recipe, progress=False)
    ranges = load_checkpoint(result.run_dir / "last.pt").int8
    assert ranges and list((tmp_path / "cache" / "int8").glob("*.json"))  # calibrated once, kept for every run
    _, _, (predictor, dataset, store, items, _) = evaluate_split(
        result.run_dir / "last.pt", split="val", progress=False
    )
    assert predictor.extractor.int8_ranges == ranges
    fresh = Predictor(result.run_dir / "last.pt")  # the int8 trunk rebuilt from the checkpoint's ranges
    for i in items:
        rec = dataset.records[store.record[i]]
        s = store.item_slice(i)
        cached = predictor.predict_features(store.rows[s], store.patch_boxes[s], rec.width, rec.height)
        np.testing.assert_allclose(fresh.predict(rec.path).scores, cached.scores, rtol=1e-3, atol=1e-6)
    # the float trunk of the same recipe keeps its own caches
    train(tiny_recipe(tmp_path, small_voc, "name=float", "train.epochs=1"), progress=False)
    metas = [json.loads(p.read_text())["fields"]["precision"] for p in (tmp_path / "cache").glob("*/meta.json")]
    assert sorted(m.split("-")[0] for m in metas) == ["fp32", "fp32", "int8", "int8"]  # train and val, each trunk


def test_a_damaged_int8_calibration_file_is_calibrated_again(tmp_path, small_voc):
    from patchnet.data import open_split
    from patchnet.features.build import calibrate_extractor
    from patchnet.features.extract import build_extractor

    recipe = tiny_recipe(tmp_path, small_voc, "backbone.precision=int8", "backbone.int8_images=1")
    train_set = open_split(recipe.data, "train")
    first = build_extractor(recipe)
    calibrate_extractor(recipe, first, train_set, progress=False)
    (kept,) = (tmp_path / "cache" / "int8").glob("*.json")
    kept.write_text('{"ranges": {"quant": [1.0, 0.0]}}')  # another trunk's, or a torn write
    again = build_extractor(recipe)
    calibrate_extractor(recipe, again, train_set, progress=False)
    assert again.int8_ranges == first.int8_ranges == json.loads(kept.read_text())["ranges"]


def test_an_ensemble_head_trains_resumes_exactly_and_scores_through_eval(tmp_path, small_voc, monkeypatch):
    from patchnet.evaluation.predictor import evaluate_split

    a, b = _straight_and_killed_after_epoch_1(
        tmp_path,
        small_voc,
        monkeypatch,
        "train.supervision=both",
        "pool.name=topk",
        "train.image_batch=2",
        "train.epochs=3",
        "head.members=3",
        "infer.fuse=true",
        "train.holdout=0.5",
        "runtime.cache_dir=" + str(tmp_path / "c"),
    )
    assert _heads_equal(a.head, b.head) and a.head["fcb.weight"].shape[0] == 3
    assert a.history[-1]["patch_acc"] > 0 and np.isfinite(a.history[-1]["loss"])
    table, _n, _ = evaluate_split(next((tmp_path / "a").rglob("last.pt")), split="val", progress=False)
    assert np.isfinite(table.map07)


def test_an_ensemble_head_is_refused_with_unlocked_stages():
    from patchnet.recipe import RecipeError

    with pytest.raises(RecipeError, match="head.members=2 with train.unlock=1"):
        recipe_from_dict({"backbone": {"name": "efficientnet_lite0"}}, ["head.members=2", "train.unlock=1"])
