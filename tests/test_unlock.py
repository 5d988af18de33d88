"""train.unlock: the trunk's last stages train on cached boundary maps; the rest stays frozen."""

import numpy as np
import pytest
import torch

import patchnet.training.trainer as train_module
from patchnet.backbones import backbone_spec, build_backbone, unlock_split
from patchnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchnet.data import load_image, open_split
from patchnet.errors import PatchnetError
from patchnet.features.build import cache_spec
from patchnet.features.extract import build_extractor
from patchnet.recipe import RecipeError
from patchnet.training.trainer import train
from patchnet.training.unlock import UnlockedStages, build_maps

from conftest import build, tiny_recipe
from test_train import _heads_equal, _straight_and_killed_after_epoch_1

LITE0 = backbone_spec("efficientnet_lite0")
QUICK = ("train.epochs=1", "train.holdout=0", "data.val_split=", "runtime.heatmaps=0")


def test_unlock_counts_stages_from_the_head_convolution_down():
    one, two, three = (unlock_split(LITE0, n) for n in (1, 2, 3))
    assert one.boundary.name == "stage7" and one.prefixes == ("_conv_head.", "_bn1.")
    assert two.boundary.name == "stage6" and two.prefixes == ("_blocks.15.", "_conv_head.", "_bn1.")
    assert three.boundary.name == "stage5" and three.prefixes[:4] == (
        "_blocks.11.",
        "_blocks.12.",
        "_blocks.13.",
        "_blocks.14.",
    )
    assert unlock_split(LITE0, 7).boundary.name == "stage1"
    with pytest.raises(PatchnetError, match="1 .its head convolution. to 7"):
        unlock_split(LITE0, 8)
    with pytest.raises(RecipeError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        tiny_recipe_for("backbone.name=resnet50", "train.unlock=1")
    with pytest.raises(RecipeError, match="train.unlock=-1"):
        tiny_recipe_for("train.unlock=-1")
    with pytest.raises(RecipeError, match="set cache.compress: none"):
        tiny_recipe_for("train.unlock=2", "cache.compress=int8")


def tiny_recipe_for(*overrides):
    from patchnet.recipe import recipe_from_dict

    return recipe_from_dict({}, list(overrides))


@pytest.mark.parametrize("fused", [False, True])
def test_the_frozen_and_the_unlocked_parts_compose_to_the_trunk(fused):
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=64)
    backbone = backbone.fused() if fused else backbone
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        whole = backbone.feature_map(x)
        for n in (1, 2, 3, 7):
            split = unlock_split(LITE0, n)
            boundary = backbone.feature_map(x, split.part)
            assert boundary.shape[1] == split.boundary.dim
            assert boundary.shape[-1] == -(-96 // split.boundary.stride)
            torch.testing.assert_close(backbone.trunk.run(boundary, split.part), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision,unlocks", [("fp32", (1, 3)), ("bf16", (2,))])
def test_before_any_step_the_head_sees_the_cached_features(tmp_path, small_voc, precision, unlocks):
    """Boundary maps + the unlocked stages = the patch features of unlock 0, within the rounding of the fp16
    maps (and of bf16 autocast, whose rounding differs between the fused frozen trunk and the stages)."""
    settings = (
        f"backbone.precision={precision}",
        f"train.precision={precision}",
        "patches.scales=[1.0, 1.5, 2.0, 3.0]",
        "patches.levels=[1, 3]",
    )
    recipe = tiny_recipe(tmp_path, small_voc, *settings)
    dataset = open_split(recipe.data, "train")
    features = build(recipe, dataset, build_extractor(recipe), progress=False)
    ref = features.rows[0 : features.num_patches]
    scale = np.abs(ref).max()
    assert scale > 1
    for n in unlocks:
        recipe = tiny_recipe(tmp_path, small_voc, f"train.unlock={n}", *settings)
        backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=32)
        extractor = build_extractor(recipe, backbone)
        maps = build_maps(cache_spec(recipe, extractor), dataset, extractor, unlock_split(LITE0, n), progress=False)
        assert maps.path != features.path and maps.map_dim == unlock_split(LITE0, n).boundary.dim
        np.testing.assert_array_equal(maps.offsets, features.offsets)
        np.testing.assert_array_equal(maps.patch_boxes, features.patch_boxes)
        assert set(np.unique(maps.patch_level)) == {0, 1}  # two levels
        maps.attach(UnlockedStages(backbone, unlock_split(LITE0, n)), torch.bfloat16 if precision == "bf16" else None)
        got = maps.rows[0 : maps.num_patches]
        assert got.shape == ref.shape
        if precision == "fp32":
            assert np.abs(got - ref).max() <= 2e-3 * scale, n
        else:
            assert np.abs(got - ref).max() <= 0.06 * scale and np.abs(got - ref).mean() <= 1e-3 * scale, n
        s = maps.item_slice(2)  # an item's rows alone, and rows from inside one item to inside the next
        for rows in (s, slice(s.start + 3, s.stop + 5)):
            np.testing.assert_allclose(maps.rows[rows], got[rows], rtol=0, atol=1e-6 * scale)


def test_unlock_needs_the_maps_of_shared_mode(tmp_path, small_voc):
    with pytest.raises(PatchnetError, match="patches.mode: shared"):
        train(tiny_recipe(tmp_path, small_voc, "train.unlock=1", "patches.mode=exact", *QUICK), progress=False)


@pytest.fixture
def captured(monkeypatch):
    """The UnlockedStages a training run builds."""
    built = []

    def spy(*args):
        built.append(UnlockedStages(*args))
        return built[-1]

    monkeypatch.setattr(train_module, "UnlockedStages", spy)
    return built


@pytest.mark.parametrize("supervision,share", [("boxes", 1.0), ("both", 1.0), ("images", 1.0), ("both", 0.5)], ids=str)
def test_a_step_trains_the_unlocked_stages_and_nothing_else(tmp_path, small_voc, captured, supervision, share):
    pool = [] if supervision == "boxes" else ["pool.name=topk"]
    pool.append(f"train.image_patches={share}")  # 0.5: the image loss over half of each image's patches
    recipe = tiny_recipe(
        tmp_path,
        small_voc,
        "train.unlock=2",
        f"train.supervision={supervision}",
        "train.image_batch=2",
        "train.unlock_lr=10",
        *pool,
        *QUICK,
    )
    train(recipe, progress=False)
    (stages,) = captured
    prefixes = unlock_split(LITE0, 2).prefixes
    before = build_backbone("efficientnet_lite0", "imagenet", input_size=32).trunk.state_dict()
    after = stages.backbone.trunk.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(prefixes) for k in moved)  # frozen stages unchanged
    assert "_blocks.15._project_conv.weight" in moved and "_conv_head.weight" in moved
    assert not any("running_" in k or "num_batches" in k for k in moved)  # BN statistics never move, anywhere
    assert "_bn1.weight" in moved  # BN affine weights of unlocked stages train
    assert not any(m.training for m in stages.backbone.modules())
    state = load_checkpoint(recipe.run_dir / "last.pt")
    assert set(state.trunk) == {k for k in before if k.startswith(prefixes)}
    assert all(torch.equal(state.trunk[k], after[k]) for k in state.trunk)


def test_resume_with_unlocked_stages_matches_a_straight_run(tmp_path, small_voc, monkeypatch):
    a, b = _straight_and_killed_after_epoch_1(
        tmp_path,
        small_voc,
        monkeypatch,
        "train.unlock=1",
        "train.supervision=both",
        "pool.name=topk",
        "train.image_batch=2",
        "train.epochs=2",
        "train.unlock_lr=0.5",
        "train.precision=bf16",
        "runtime.cache_dir=" + str(tmp_path / "c"),
    )
    assert _heads_equal(a.head, b.head) and _heads_equal(a.trunk, b.trunk)
    # the unlocked stages' own groups: train.unlock_lr x train.lr, decayed with the head's (after epochs 1 and 2)
    assert [g["lr"] for g in a.training["optimizer"]["param_groups"]] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5])
    assert [g["weight_decay"] for g in a.training["optimizer"]["param_groups"]] == [5e-4, 0.0, 5e-4, 0.0]


def test_an_unlocked_checkpoint_scores_new_images_with_its_trained_stages(tmp_path, small_voc):
    from patchnet.evaluation.predictor import Predictor, evaluate_split

    recipe = tiny_recipe(
        tmp_path, small_voc, "train.unlock=1", "train.unlock_lr=30", "train.holdout=0", "train.epochs=1"
    )
    result = train(recipe, progress=False)
    last = recipe.run_dir / "last.pt"
    predictor = Predictor(last)
    assert "+unlock1:" in predictor.extractor.backbone.weights_id
    image = load_image(small_voc / "JPEGImages" / "e.jpg")
    trained = predictor.extractor(image)
    frozen = build_extractor(recipe)(image)
    assert (trained - frozen).abs().max() > 0.05 * frozen.abs().max()  # the stages did move
    # the training run scored val through its maps and stages; eval extracts the trained trunk's features
    val = open_split(recipe.data, "val")
    extractor = build_extractor(recipe)
    maps = build_maps(cache_spec(recipe, extractor), val, extractor, unlock_split(LITE0, 1), progress=False)
    stages = UnlockedStages(build_backbone("efficientnet_lite0", "imagenet", input_size=32), unlock_split(LITE0, 1))
    stages.load(load_checkpoint(last).trunk)
    maps.attach(stages, None)
    s = maps.item_slice(0)
    np.testing.assert_allclose(trained.numpy(), maps.rows[s], rtol=0, atol=2e-3 * float(trained.abs().max()))
    table, _, _ = evaluate_split(last, split="val", progress=False)
    np.testing.assert_allclose(table.ap07, result.table.ap07)

    state = load_checkpoint(last)
    del state.trunk["_conv_head.weight"]
    save_checkpoint(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt: the trained stages hold 5 tensors"):
        Predictor(tmp_path / "partial.pt")
    state.trunk = None
    save_checkpoint(state, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="carries no trained stages"):
        Predictor(tmp_path / "none.pt")
