import numpy as np
import pytest
from typer.testing import CliRunner

from patchnet.cli import app
from patchnet.evaluation.metrics import ap_table
from patchnet.studies.linear import SplitFeatures, cv_folds, fit_linear

from conftest import tiny_recipe


def _separable(n=60, d=8, seed=0):
    """Two well-separated clusters (also after L2 normalisation): class "pos" around +mu, "neg" around -mu."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(d)
    mu[0] = 3.0
    side = np.where(rng.random(n) < 0.5, 1, -1)
    x = side[:, None] * mu + 0.5 * rng.normal(size=(n, d))
    labels = np.stack([side, -side], 1).astype(np.int8)
    return x, labels


def test_linear_svm_separates_a_separable_set():
    x, labels = _separable()
    train = SplitFeatures([str(i) for i in range(len(x))], x, labels, ["pos", "neg"])
    model = fit_linear(train, "svm", progress=False)
    x2, labels2 = _separable(seed=5)  # fresh samples of the same distribution
    table = ap_table(model.decision(x2), labels2, ["pos", "neg"])
    assert table.ap.tolist() == pytest.approx([1.0, 1.0])
    assert all(c in (0.01, 0.1, 1.0, 10.0) for c in model.cs)


def test_logistic_regression_and_difficult_labels_left_out():
    x, labels = _separable(seed=1)
    labels[:5, 0] = 0  # difficult-only: not used for class 0
    model = fit_linear(
        SplitFeatures([str(i) for i in range(len(x))], x, labels, ["pos", "neg"]), "logreg", grid=(1.0,), progress=False
    )
    assert model.cs == [1.0, 1.0]
    assert ap_table(model.decision(x), labels, ["pos", "neg"]).map > 0.99


def test_cv_folds_keep_the_views_of_one_image_together():
    rng = np.random.default_rng(0)
    y = np.repeat(np.where(rng.random(40) < 0.4, 1, -1), 3)  # 40 images, 3 views each
    groups = np.repeat(np.arange(40), 3)
    folds = cv_folds(y, groups, folds=3, seed=0)
    assert len(folds) == 3
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert (y[test] == 1).any() and (y[test] == -1).any()
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(120))


runner = CliRunner()


def test_features_linear_and_retrieve_commands(tmp_path, small_voc):
    tiny_recipe(tmp_path, small_voc)  # validates the overrides below
    recipe_file = tmp_path / "r.yaml"
    from patchnet.recipe import save_recipe

    save_recipe(tiny_recipe(tmp_path, small_voc), recipe_file)
    out = tmp_path / "f.npz"
    r = runner.invoke(app, ["features", "-r", str(recipe_file), "--split", "train", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with np.load(out) as f:
        first, ids = f["features"], f["ids"].tolist()
    assert first.shape == (4, 1280) and ids == ["a", "b", "c", "d"]
    r = runner.invoke(
        app, ["features", "-r", str(recipe_file), "--split", "train", "--out", str(out), "--features", "max"]
    )
    assert r.exit_code == 0, r.output
    with np.load(out) as f:
        assert not np.allclose(f["features"], first)
    r = runner.invoke(
        app,
        [
            "linear",
            "-r",
            str(recipe_file),
            "--train-split",
            "train",
            "--split",
            "val",
            "--c",
            "1",
            "--out",
            str(tmp_path / "lin"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "mAP" in r.output and (tmp_path / "lin" / "linear_svm_whole.json").is_file()
    page = tmp_path / "ret.html"
    r = runner.invoke(
        app,
        [
            "retrieve",
            "-r",
            str(recipe_file),
            "--split",
            "train",
            "--queries",
            "a,c",
            "--neighbours",
            "2",
            "--out",
            str(page),
        ],
    )
    assert r.exit_code == 0, r.output
    text = page.read_text()
    assert text.startswith("<!doctype html>") and text.count("data:image/jpeg;base64,") == 2 * 3 + 4  # + the map's
    assert "precision@2" in text and "P@2" in r.output
    r = runner.invoke(app, ["retrieve", "-r", str(recipe_file), "--split", "train", "--queries", "zzz"])
    assert r.exit_code == 2 and "query 'zzz' is not an image" in r.output
