"""The scripts in tools/ on a tiny trained model."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patchnet.head.layers import AdaptationHead
from patchnet.outputs.heatmaps import best_patch_per_item, class_index, top_items
from patchnet.training.trainer import train

from conftest import four_voc, tiny_recipe

TOOLS = Path(__file__).parent.parent / "tools"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):

    tmp = tmp_path_factory.mktemp("tools")
    root = four_voc(tmp / "VOC", ["a", "b", "c", "d"])
    recipe = tiny_recipe(tmp, root, "train.epochs=1")
    train(recipe, progress=False)
    return tmp, recipe


def _run(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow  # a subprocess or several processes
def test_render_heatmaps_for_files_and_a_split(trained):
    tmp, recipe = trained
    ckpt = recipe.run_dir / "best.pt"
    img = Path(recipe.data.root) / "JPEGImages" / "a.jpg"
    r = _run(TOOLS / "render_heatmaps.py", "--checkpoint", ckpt, img, "--top", "2", "--out", tmp / "h1", cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert (tmp / "h1" / "a.png").read_bytes()[:4] == b"\x89PNG"
    r = _run(
        TOOLS / "render_heatmaps.py",
        "--checkpoint",
        ckpt,
        "--split",
        "val",
        "--classes",
        "dog,cat",
        "--no-grid",
        "--reduce",
        "max",
        "--out",
        tmp / "h2",
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    assert "warm feature cache" in r.stdout  # training cached the val split
    assert sorted(p.name for p in (tmp / "h2").iterdir())[:2] == ["a_cat.png", "a_dog.png"]
    assert len(list((tmp / "h2").iterdir())) == 8


@pytest.mark.slow  # a subprocess or several processes
def test_render_heatmaps_rejects_an_unknown_class_with_the_valid_names(trained):
    tmp, recipe = trained
    r = _run(
        TOOLS / "render_heatmaps.py",
        "--checkpoint",
        recipe.run_dir / "best.pt",
        "--split",
        "val",
        "--classes",
        "unicorn",
        cwd=tmp,
    )
    assert r.returncode == 2
    assert "unknown class name(s) unicorn; valid names: cat, dog, person" in r.stderr


@pytest.mark.slow  # a subprocess or several processes
def test_top_patches_writes_a_sheet_per_class(trained):
    tmp, recipe = trained
    r = _run(
        TOOLS / "top_patches.py",
        "--checkpoint",
        recipe.run_dir / "best.pt",
        "--split",
        "val",
        "--n",
        "4",
        "--out",
        tmp / "top",
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp / "top").iterdir()) == ["top4_cat.png", "top4_dog.png", "top4_person.png"]


def test_best_patch_per_item_and_top_items_by_hand():
    import torch

    head = AdaptationHead(2, 2, hidden=4, dropout=0.0)
    with torch.no_grad():  # probabilities follow the first feature for class 0, the second for class 1
        head.fca[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0]]))
        head.fca[0].bias.zero_()
        head.fcb.weight.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 0]]))
        head.fcb.bias.zero_()
    feats = np.array([[0, 0], [2, 0], [0, 1], [1, 0], [0, 3]], np.float32)
    offsets = np.array([0, 3, 3, 5])  # item 1 has no patches
    scores, patches = best_patch_per_item(feats, offsets, head, 2, batch_size=2)
    assert patches[0].tolist() == [1, 2] and patches[1].tolist() == [-1, -1] and patches[2].tolist() == [0, 1]
    assert scores[1].tolist() == [-1, -1]
    assert top_items(scores, np.array([True, True, True]), 1, 2) == [2, 0]
    assert top_items(scores, np.array([True, True, False]), 1, 2) == [0]


def test_class_index():
    assert class_index(["a", "b"], ["b"]) == [1]
    with pytest.raises(ValueError, match="valid names: a, b"):
        class_index(["a", "b"], ["c"])


def test_ship_model_keeps_what_scoring_reads_and_drops_what_resuming_needs(trained):
    """tools/ship_model.py's slim copy: the head in fp16, no training state, history or data fingerprint; it
    loads back as a checkpoint and scores as the run's own within fp16's precision."""
    import importlib.util

    from patchnet import load
    from patchnet.checkpoint import load_checkpoint, save_checkpoint

    tmp, recipe = trained
    spec = importlib.util.spec_from_file_location("ship_model", TOOLS / "ship_model.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    full = load_checkpoint(recipe.run_dir / "last.pt")
    assert full.training is not None and full.history and full.data is not None
    save_checkpoint(ship.slim(full, {"name": "x"}), tmp / "slim.pt")
    slim = load_checkpoint(tmp / "slim.pt")
    assert slim.training is None and slim.history == [] and slim.data is None and slim.card == {"name": "x"}
    assert {t.dtype for t in slim.head.values()} == {torch.float16}
    assert slim.recipe["runtime"]["cache_dir"] == ".cache/features" and slim.classes == full.classes
    image = Path(recipe.data.root) / "JPEGImages" / "a.jpg"
    a = load(recipe.run_dir / "last.pt", device="cpu").predict(image)
    np.testing.assert_allclose(a.scores, load(tmp / "slim.pt", device="cpu").predict(image).scores, atol=1e-2)
