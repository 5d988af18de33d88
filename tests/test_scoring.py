"""The inference options, resolved once into a checkpoint's recipe, and the scores and maps they give through the
API, the command line and the TensorBoard heatmaps, against references built from the lower functions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from patchnet.evaluation.scoring import InferOptions
from patchnet.recipe import Recipe, RecipeError, recipe_from_dict

from conftest import calibrated_model, write_image


def test_options_resolve_as_typed_values_into_a_copy_of_the_recipe():
    recipe = recipe_from_dict({})
    options = InferOptions(device="cpu", precision="fp32", mode="shared", pool="max", k=3, map_prior=5)
    r = options.resolve(recipe)
    assert (r.runtime.device, r.backbone.precision, r.patches.mode) == ("cpu", "fp32", "shared")
    assert (r.infer.pool, r.infer_pool, r.pool.k, r.infer.map_prior) == ("max", "max", 3.0, 5.0)
    assert recipe.to_dict() == recipe_from_dict({}).to_dict()  # the recipe given is left as it was
    assert InferOptions().resolve(recipe).to_dict() == recipe.to_dict()  # nothing given: the recipe's own


def test_bad_options_get_the_recipe_s_own_errors():
    with pytest.raises(RecipeError) as as_set:
        recipe_from_dict({}, ["infer.pool=median"])
    with pytest.raises(RecipeError) as as_option:
        InferOptions(pool="median").resolve(Recipe())
    assert str(as_option.value) == str(as_set.value) and "infer.pool must be one of" in str(as_set.value)
    with pytest.raises(RecipeError, match="backbone.precision must be one of"):
        InferOptions(precision="int4").resolve(Recipe())
    for prior in (-1.0, math.nan):  # -1 was render_heatmaps' "the recipe's"; now None says that
        with pytest.raises(RecipeError, match="map prior .* must be at least 0"):
            InferOptions(map_prior=prior)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return calibrated_model(tmp_path_factory.mktemp("scoring"))


def _reference(predictor, path, prior):
    """Scores and cat map of one image from the extractor, the head, the pooling and score_map directly."""
    from patchnet.data import load_image
    from patchnet.evaluation.maps import score_map
    from patchnet.head.pooling import map_values, pool_image

    image = load_image(path)
    features, plan = predictor.extractor.extract(image)
    logits = predictor.head.logits(predictor.codec.roundtrip(features))
    scores = pool_image(logits, predictor.recipe.pool, predictor.recipe.infer_pool)
    values = map_values(logits, predictor.recipe.infer_pool).numpy()
    return scores, score_map(plan.boxes, values[:, 0], image.shape[1], image.shape[0], prior=prior)


def test_the_api_and_predict_score_as_the_reference_with_the_default_options_and_a_map_prior(model, tmp_path):
    from typer.testing import CliRunner

    import patchnet
    from patchnet.cli import app

    m, root = model
    path = root / "JPEGImages" / "a.jpg"
    scores, plain_map = _reference(m.predictor, path, 0.0)
    _, prior_map = _reference(m.predictor, path, 4.0)
    assert not np.allclose(plain_map, prior_map)  # the prior changes the map, so the checks below can fail
    np.testing.assert_allclose(m.predict(path).scores[0], scores, rtol=1e-6)
    np.testing.assert_array_equal(m.score_maps(path, ["cat"])["cat"], plain_map)  # the recipe's prior: 0
    np.testing.assert_array_equal(m.score_maps(path, ["cat"], prior=4.0)["cat"], prior_map)
    set_once = patchnet.load(m.predictor.state_path, device="cpu", options=InferOptions(map_prior=4.0))
    assert set_once.predictor.recipe.infer.map_prior == 4.0
    np.testing.assert_array_equal(set_once.score_maps(path, ["cat"])["cat"], prior_map)
    np.testing.assert_allclose(set_once.predict(path).scores[0], scores, rtol=1e-6)  # scores keep no prior
    out = tmp_path / "p.json"
    ckpt = str(m.predictor.state_path)
    result = CliRunner().invoke(app, ["predict", "-c", ckpt, "--device", "cpu", str(path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    cli = json.loads(out.read_text())["images"][str(path)]
    np.testing.assert_allclose([cli[c]["score"] for c in m.classes], scores, rtol=1e-6)


def test_eval_plays_the_pointing_game_with_the_prior_given_or_the_recipe_s(model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from patchnet.cli import app
    from patchnet.evaluation import maps
    from patchnet.evaluation.predictor import evaluate_split

    m, _root = model
    ckpt = str(m.predictor.state_path)
    _, _, (predictor, dataset, store, items, _) = evaluate_split(ckpt, split="train", progress=False)
    played, game = [], maps.pointing_game

    def recorded(*args):
        played.append(args[-1])  # the prior, the last argument eval passes
        return game(*args)

    monkeypatch.setattr(maps, "pointing_game", recorded)
    for prior, extra in ((0.0, []), (50.0, ["--prior", "50"])):  # the recipe's infer.map_prior is 0
        out = tmp_path / f"p{prior:g}"
        args = ["eval", "-c", ckpt, "--split", "train", "--pointing", "--device", "cpu", "--out", str(out), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        want = game(predictor.head, store, dataset, items, predictor.pool, prior).rates()
        saved = json.loads((out / "eval_train.json").read_text())["pointing"]
        assert json.dumps(saved, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN rates too
    assert played == [0.0, 50.0]
    result = CliRunner().invoke(app, ["eval", "-c", ckpt, "--split", "train", "--pointing", "--prior", "-1"])
    assert result.exit_code == 2 and "map prior counts pseudo-patches" in result.output


def test_tensorboard_heatmaps_draw_the_maps_with_the_recipe_s_prior(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from patchnet.data import ImageRecord
    from patchnet.evaluation.maps import score_map
    from patchnet.head.pooling import map_values, pool_image
    from patchnet.outputs import heatmaps

    boxes = np.array([[0, 0, 20, 20], [10, 0, 40, 20], [0, 0, 40, 20]], np.float32)
    logits = np.array([[3, -1, 0], [-2, 2, 0], [0, 0, 0]], np.float32)  # (class a, class b, background)
    store = SimpleNamespace(record=np.array([0]), patch_boxes=boxes, rows=logits, item_slice=lambda i: slice(0, 3))
    empty = np.zeros(0, np.int64)
    image = write_image(tmp_path / "x.jpg", 40, 20)
    rec = ImageRecord("x", image, 40, 20, np.zeros((0, 4), np.float32), empty, empty.astype(bool), np.ones(2, np.int8))
    split = SimpleNamespace(store=store, dataset=SimpleNamespace(records=[rec], classes=["a", "b"]))
    head = SimpleNamespace(logits=lambda x: torch.as_tensor(x))
    recipe = recipe_from_dict({"infer": {"map_prior": 6.0}, "runtime": {"heatmaps": 1}})
    drawn = []
    monkeypatch.setattr(heatmaps, "heatmap_figure", lambda image, maps, titles, cols: drawn.append(maps))
    heatmaps.log_heatmaps(SimpleNamespace(add_figure=lambda *a: None), head, split, recipe, 1, np.array([0]))
    (maps,) = drawn
    x = torch.as_tensor(logits)
    chosen = heatmaps.top_classes(pool_image(x, recipe.pool, recipe.infer_pool), 2)
    values = map_values(x, recipe.infer_pool).numpy()
    for got, c in zip(maps, chosen):
        np.testing.assert_allclose(got, score_map(boxes, values[:, c], 40, 20, prior=6.0), rtol=1e-6)
    assert not np.allclose(maps[0], score_map(boxes, values[:, chosen[0]], 40, 20))  # the prior shows
