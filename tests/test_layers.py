import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchnet.backbones import BACKBONES
from patchnet.cli import app
from patchnet.data import load_image, open_split
from patchnet.features import stages
from patchnet.features.extract import build_extractor
from patchnet.features.stages import build_stage_extractor, stage_features, stage_recipe
from patchnet.recipe import save_recipe
from patchnet.studies.linear import split_features, whole_image_recipe

from conftest import tiny_recipe

runner = CliRunner()
LITE0_STAGES = ["stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head"]


@pytest.mark.parametrize(
    "name,extra", [("efficientnet_lite0", ()), ("alexnet", ("backbone.weights=random", "backbone.input_size=64"))]
)
@pytest.mark.parametrize("pool", ["whole", "max"])
def test_last_stage_is_the_existing_feature(small_voc, tmp_path, name, extra, pool):
    """The deepest stage equals the features of patchnet linear: whole-image (and mirror) or max-pooled patches."""
    r = tiny_recipe(tmp_path, small_voc, f"backbone.name={name}", *extra)
    image = load_image(small_voc / "JPEGImages" / "b.jpg")
    torch.manual_seed(0)  # the same random weights in both
    existing = build_extractor(whole_image_recipe(r) if pool == "whole" else r)(image)
    want = existing.mean(0) if pool == "whole" else existing.amax(0)
    torch.manual_seed(0)
    got = build_stage_extractor(stage_recipe(r, pool))(image)
    last = BACKBONES[name].stages[-1].name
    assert last == ("head" if name.startswith("eff") else "fc7")
    assert got[last].shape == want.shape
    torch.testing.assert_close(got[last], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_stage_vectors_are_cached_and_reused(small_voc, tmp_path, monkeypatch):
    r = stage_recipe(tiny_recipe(tmp_path, small_voc), "whole")
    dataset = open_split(r.data, "train")
    first = stage_features(r, dataset, build_stage_extractor(r), progress=False)
    assert list(first.features) == LITE0_STAGES
    assert first.ids == ["a", "b", "c", "d"]
    assert [first.features[s].shape[1] for s in LITE0_STAGES] == [16, 24, 40, 80, 112, 192, 320, 1280]
    # the head stage is the whole-image feature of the feature cache (stored there in fp16)
    whole = split_features(r, dataset, build_extractor(r), "mean", progress=False)
    np.testing.assert_allclose(first.features["head"], whole.features, rtol=2e-2, atol=2e-3)

    def no_trunk(self, image):
        raise AssertionError("the trunk ran although the stage vectors are cached")

    monkeypatch.setattr(stages.StageExtractor, "__call__", no_trunk)
    again = stage_features(r, dataset, build_stage_extractor(r), progress=False)
    for s in LITE0_STAGES:
        np.testing.assert_array_equal(again.features[s], first.features[s])
    # another pooling is another key: it must compute
    with pytest.raises(AssertionError, match="trunk ran"):
        m = stage_recipe(r, "max")
        stage_features(m, dataset, build_stage_extractor(m), progress=False)


def test_layers_command_writes_table_json_and_plot(small_voc, tmp_path):
    path = tmp_path / "tiny.yaml"
    save_recipe(tiny_recipe(tmp_path, small_voc), path)
    out = tmp_path / "study"
    result = runner.invoke(
        app,
        [
            "layers",
            "--recipe",
            str(path),
            "--train-split",
            "train",
            "--split",
            "val",
            "--methods",
            "svm,logreg",
            "--c",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    for s in LITE0_STAGES:
        assert s in result.output
    assert "svm mAP07" in result.output and "logreg mAP07" in result.output
    study = json.loads((out / "layers.json").read_text())
    assert [s["stage"] for s in study["stages"]] == LITE0_STAGES
    assert [s["stride"] for s in study["stages"]] == [2, 4, 8, 16, 16, 32, 32, 32]
    assert study["train_images"] == 4 and study["val_images"] == 2
    for s in study["stages"]:
        assert set(s["methods"]) == {"svm", "logreg"}
        assert 0.0 <= s["methods"]["svm"]["map07"] <= 1.0
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--features", "mean"], "--features must be one of whole, max"),
        (["--pool", "mean"], "--features must be one of whole, max"),  # its old name, hidden
        (["--methods", "svm,tree"], "--methods must name some of svm, logreg"),
    ],
)
def test_layers_command_rejects_bad_choices_in_one_line(small_voc, tmp_path, args, message):
    path = tmp_path / "tiny.yaml"
    save_recipe(tiny_recipe(tmp_path, small_voc), path)
    result = runner.invoke(app, ["layers", "--recipe", str(path), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
