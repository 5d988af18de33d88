from pathlib import Path

import pytest

from patchnet.recipe import PAPER_SCALES, Recipe, RecipeError, load_recipe, recipe_from_dict, save_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_shipped_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"demo", "voc07", "voc07_trainval", "voc07_dev", "coco_example"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.name
    assert all(s >= 1 for s in r.patches.scales)


def test_the_fast_recipe_is_the_dev_recipe_with_two_levels_and_the_patch_loss():
    recipes = Path(__file__).parent.parent / "recipes"
    dev, fast = load_recipe(recipes / "voc07_dev.yaml"), load_recipe(recipes / "voc07_fast.yaml")
    assert fast.patches.levels == [1.0, 2.0] and fast.train.supervision == "boxes"
    assert fast.infer_pool == "power" and fast.infer.fuse
    assert (fast.data, fast.backbone, fast.patches.scales, fast.train.epochs) == (
        dev.data,
        dev.backbone,
        dev.patches.scales,
        dev.train.epochs,
    )


def test_voc07_carries_the_papers_settings():
    r = load_recipe(Path(__file__).parent.parent / "recipes" / "voc07.yaml")
    assert r.backbone.name == "alexnet" and r.patches.mode == "exact"
    assert r.patches.scales == PAPER_SCALES
    assert (r.train.lr, r.train.momentum, r.train.schedule, r.train.max_decays) == (0.01, 0.9, "plateau", 3)
    assert (r.train.bg_rate, r.pool.k, r.head.hidden, r.head.dropout) == (0.1, 5.0, 2048, 0.5)
    assert (r.data.train_split, r.data.val_split) == ("trainval", "")  # test is never touched in training


def test_overrides_are_typed():
    r = recipe_from_dict(
        {},
        [
            "train.lr=0.001",
            "train.epochs=3",
            "patches.scales=[1, 2]",
            "infer.k=10",
            "backbone.channels_last=false",
            "data.val_split=",
        ],
    )
    assert r.train.lr == 0.001 and isinstance(r.train.lr, float)
    assert r.train.epochs == 3
    assert r.patches.scales == [1.0, 2.0] and all(isinstance(s, float) for s in r.patches.scales)
    assert r.pool.k == 10.0 and r.backbone.channels_last is False  # infer.k, as older recipes wrote it
    assert r.data.val_split == ""


def test_unknown_keys_and_bad_types_are_explained():
    with pytest.raises(
        RecipeError, match=r"unknown recipe key train.learning_rate; valid keys here: train.supervision"
    ):
        recipe_from_dict({}, ["train.learning_rate=0.1"])
    with pytest.raises(RecipeError, match=r"train.epochs must be of type int, got 'many'"):
        recipe_from_dict({}, ["train.epochs=many"])
    with pytest.raises(RecipeError, match=r"patches.mode must be one of exact, shared, whole; got 'fast'"):
        recipe_from_dict({}, ["patches.mode=fast"])
    with pytest.raises(RecipeError, match=r"patches.step must lie in \(0, 0.5\]"):
        recipe_from_dict({}, ["patches.step=0.7"])
    with pytest.raises(RecipeError, match=r"patches.exact_up_to applies to shared mode .* patches.mode=exact"):
        recipe_from_dict({}, ["patches.mode=exact", "patches.exact_up_to=2.0"])
    with pytest.raises(RecipeError, match=r"must be 0 \(off\) or a scale >= 1; got 0.5"):
        recipe_from_dict({}, ["patches.exact_up_to=0.5"])
    for bad in ("0", "1.5"):
        with pytest.raises(RecipeError, match=rf"train.image_patches must lie in \(0, 1\] .*got {bad}"):
            recipe_from_dict({}, [f"train.image_patches={bad}"])
    with pytest.raises(RecipeError, match=r"head.dropout must lie in \[0, 1\), got 1.0"):
        recipe_from_dict({}, ["head.dropout=1.0"])
    with pytest.raises(RecipeError, match="section.field=value"):
        recipe_from_dict({}, ["train.lr"])
    with pytest.raises(RecipeError, match="must be a mapping"):
        recipe_from_dict({"train": 3})


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(RecipeError, match="bad.yaml: .*not valid YAML|bad.yaml is not valid YAML"):
        load_recipe(bad)
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: train.lr must be of type float"):
        load_recipe(bad)


def test_a_typo_in_a_key_or_a_section_is_answered_with_the_closest_valid_name():
    with pytest.raises(RecipeError, match=r"unknown recipe key train.epoch; did you mean train.epochs\? valid keys"):
        recipe_from_dict({}, ["train.epoch=3"])
    with pytest.raises(RecipeError, match=r"unknown recipe section tran; did you mean train\? valid keys here: name,"):
        recipe_from_dict({}, ["tran.epochs=3"])
    with pytest.raises(RecipeError, match=r"did you mean train.epochs for train.epoch, train.lr for train.lrr\?"):
        recipe_from_dict({}, ["train.epoch=3", "train.lrr=0.1"])
    with pytest.raises(RecipeError, match=r"unknown recipe key train.colour; valid keys"):  # nothing close
        recipe_from_dict({}, ["train.colour=3"])


def test_an_error_names_the_override_it_comes_from_and_the_file_only_for_its_own(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["train.lr=0.1", "train.epoch=3"])
    assert str(e.value).startswith("--set train.epoch=3: unknown recipe key train.epoch; did you mean train.epochs?")
    assert "r.yaml" not in str(e.value)
    with pytest.raises(RecipeError, match=r"^--set train.epochs=many: train.epochs must be of type int"):
        load_recipe(path, ["train.epochs=many"])
    with pytest.raises(RecipeError, match=r"^--set data.boxes=false: train.supervision=boxes needs boxes"):
        load_recipe(path, ["data.boxes=false"])  # valid alone, invalid with the override
    path.write_text("tran:\n  epochs: 2\n")
    with pytest.raises(RecipeError, match=r"r.yaml: unknown recipe section tran; did you mean train\?"):
        load_recipe(path, ["train.lr=0.1"])  # the file's typo, whatever the overrides


def test_saved_recipe_loads_back_identically(tmp_path):
    r = recipe_from_dict({"name": "x"}, ["train.lr=0.02", "patches.levels=[1, 2]"])
    save_recipe(r, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == r


def test_image_supervision_needs_an_evidence_pooling_and_boxes_need_boxes():
    with pytest.raises(RecipeError, match="pool.name to max, lse or topk"):
        recipe_from_dict({}, ["train.supervision=both"])
    with pytest.raises(RecipeError, match="train.supervision=images"):
        recipe_from_dict({}, ["data.boxes=false"])
    with pytest.raises(RecipeError, match="boxes, images, both"):
        recipe_from_dict({}, ["train.supervision=pixels"])
    r = recipe_from_dict({}, ["train.supervision=images", "pool.name=topk", "data.boxes=false", "infer.pool=power"])
    assert r.infer_pool == "power" and recipe_from_dict({}, ["pool.name=lse"]).infer_pool == "lse"


def test_a_recipe_inherits_from_its_base_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  lr: 0.05\n  epochs: 7\npool:\n  k: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../base.yaml\nname: child\ntrain:\n  epochs: 2\n")
    r = load_recipe(tmp_path / "sub" / "child.yaml")
    assert (r.name, r.train.lr, r.train.epochs, r.pool.k) == ("child", 0.05, 2, 3.0)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match=r"nowhere.yaml \(the base of .*orphan.yaml\) does not exist"):
        load_recipe(tmp_path / "orphan.yaml")


def test_choices_are_checked_by_their_literal_types():
    with pytest.raises(RecipeError, match="patches.mode must be one of exact, shared, whole; got 'crop'"):
        recipe_from_dict({}, ["patches.mode=crop"])
    with pytest.raises(RecipeError, match="infer.pool must be one of '', power, max, lse, topk"):
        recipe_from_dict({}, ["infer.pool=mean"])


def test_keys_of_older_recipes_move_to_the_runtime_and_pool_sections():
    r = recipe_from_dict(
        {
            "output": "runs",
            "backbone": {"device": "cpu", "batch_size": 8},
            "cache": {"dir": "c"},
            "train": {"num_workers": 0, "heatmaps": 1},
            "infer": {"k": 3},
        }
    )
    rt = r.runtime
    assert (rt.output, rt.device, rt.trunk_batch, rt.cache_dir, rt.workers, rt.heatmaps) == (
        "runs",
        "cpu",
        8,
        "c",
        0,
        1,
    )
    assert r.pool.k == 3.0 and str(r.run_dir) == "runs/run"


def test_cache_compression_settings():
    r = recipe_from_dict({}, ["cache.compress=pca_int8", "cache.pca_dim=128"])
    assert r.cache.compress == "pca_int8" and r.cache.pca_dim == 128 and Recipe().cache.compress == "none"
    with pytest.raises(RecipeError, match="cache.compress must be one of none, int8, pca, pca_int8"):
        recipe_from_dict({}, ["cache.compress=fp8"])
    with pytest.raises(RecipeError, match="cache.pca_dim and cache.pca_images must be at least 1"):
        recipe_from_dict({}, ["cache.compress=pca", "cache.pca_dim=0"])


def test_one_lr_serves_every_supervision_and_far_from_it_images_are_warned():
    dev = Path(__file__).parent.parent / "recipes" / "voc07_dev.yaml"
    for supervision in ("boxes", "both", "images"):  # the dev recipe's lr 0.01
        assert load_recipe(dev, [f"train.supervision={supervision}"]).underfit_warnings() == []
    for lr in ("0.3", "0.0005"):  # the old averaged loss's lr; the old underfitting setting, summed
        (warning,) = load_recipe(dev, ["train.supervision=images", f"train.lr={lr}"]).underfit_warnings()
        assert f"train.lr={lr}:" in warning and "use train.lr=0.01" in warning
    assert all(load_recipe(p).underfit_warnings() == [] for p in RECIPES)
