from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from patchnet.backbones import Backbone, BackboneError
from patchnet.errors import PatchnetError
from patchnet.studies.receptive import receptive_field, trunk_layers
from patchnet.studies.units import UnitPeaks, first_filters, map_peaks, unit_views

from conftest import tiny_recipe

TOOLS = Path(__file__).parent.parent / "tools"


def test_receptive_field_of_a_hand_computed_stack():
    # (kernel, stride, left padding, dilation)
    rf = receptive_field([(3, 1, 1, 1), (2, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1)])
    # sizes 1 -> 3 -> 4 (stride 2) -> 8 -> 12 (stride 4); unit 0 centred on the first 2x2 pool cell
    assert (rf.size, rf.stride, rf.start) == (12, 4, 1.0)
    assert rf.centre(3) == 13.0
    dilated = receptive_field([(3, 2, 0, 1), (3, 1, 2, 2)])  # a dilated 3x3 spans 5 cells of stride 2
    assert (dilated.size, dilated.stride, dilated.start) == (11, 2, 1.5)


def test_receptive_field_is_where_the_gradient_of_a_unit_reaches():
    """On a linear stack with positive weights, a unit's input gradient is non-zero exactly on its receptive field."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(1, 1, 5, stride=2, padding=2),
        nn.Conv2d(1, 1, 3, padding=2, dilation=2),
    )
    for m in net:
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, 0.5, 1.0)
    rf = receptive_field(trunk_layers(net))
    x = torch.rand(1, 1, 64, 64, requires_grad=True)
    y, xc = 6, 7
    net(x)[0, 0, y, xc].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    cols = torch.nonzero(x.grad[0, 0].abs().sum(0)).flatten()
    assert rows[-1] - rows[0] + 1 == rf.size and cols[-1] - cols[0] + 1 == rf.size
    assert (rows[0] + rows[-1] + 1) / 2 == rf.centre(y) and (cols[0] + cols[-1] + 1) / 2 == rf.centre(xc)


def test_trunk_layers_stop_at_the_module_and_skip_shortcuts():
    block = nn.Sequential()
    block.conv = nn.Conv2d(4, 4, 3, padding=1)
    block.downsample = nn.Conv2d(4, 4, 1, stride=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 7, stride=2, padding=3), nn.MaxPool2d(3, 2, 1), block, nn.Conv2d(4, 4, 3))
    assert trunk_layers(net, "1") == [(7, 2, 3, 1), (3, 2, 1, 1)]
    assert trunk_layers(net, "2") == [(7, 2, 3, 1), (3, 2, 1, 1), (3, 1, 1, 1), (1, 2, 0, 1)]
    assert trunk_layers(net, "2", ("downsample",)) == [(7, 2, 3, 1), (3, 2, 1, 1), (3, 1, 1, 1)]
    assert len(trunk_layers(net, "", ("downsample",))) == 4


def test_top_patches_take_each_channel_s_highest_images_once_with_their_location():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 2, 4, 6)).astype(np.float32)  # 5 images, 2 channels, 4x6 cells
    maps[3, 0, 2, 5] = 9.0  # channel 0: image 3 highest, twice ...
    maps[3, 0, 0, 1] = 8.0
    maps[1, 0, 1, 2] = 7.0  # ... then image 1
    maps[0, 1, 3, 0] = 5.0
    rows = [map_peaks(torch.from_numpy(m)) for m in maps]
    peaks = UnitPeaks(np.arange(5), *(np.stack([r[i] for r in rows]) for i in range(3)), np.ones((5, 2)))
    top = peaks.top(0, 3)
    assert top[:2] == [3, 1]  # one location per image: image 3's second peak does not come second
    assert (peaks.ys[3, 0], peaks.xs[3, 0]) == (2, 5) and (peaks.ys[1, 0], peaks.xs[1, 0]) == (1, 2)
    assert peaks.top(1, 1) == [0] and (peaks.ys[0, 1], peaks.xs[0, 1]) == (3, 0)
    assert peaks.values[3, 0] == 9.0
    assert peaks.most_active(1) == [0] and peaks.most_active(0) == [0, 1]


def test_first_filters_fold_batchnorm_and_normalisation():
    conv, bn = nn.Conv2d(3, 2, 3, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.0, 2.0]))  # a negative scale flips the filter
    std = (0.5, 0.25, 1.0)
    backbone = Backbone(
        "test", nn.Sequential(conv, bn), nn.Identity(), feature_dim=2, input_size=32, stride=1, mean=(0.0,) * 3, std=std
    )
    got = first_filters(backbone)
    assert got.shape == (2, 3, 3, 3)
    w = -conv.weight[0].detach() / torch.tensor(std).view(3, 1, 1)
    want = ((w - w.min()) / (w.max() - w.min())).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[0], want, atol=1e-6)
    assert got[1].min() == 0.0 and got[1].max() == 1.0


def test_unit_views_refuse_a_layer_without_locations(small_voc, tmp_path):
    r = tiny_recipe(tmp_path, small_voc)
    with pytest.raises(BackboneError, match="no stage 'conv9'; its stages: stage1"):
        unit_views(r, "train", "conv9", out=tmp_path / "u", progress=False)
    torch.manual_seed(0)
    alex = tiny_recipe(
        tmp_path, small_voc, "backbone.name=alexnet", "backbone.weights=random", "backbone.input_size=64"
    )
    with pytest.raises(PatchnetError, match="fc7 of alexnet is a vector without locations; choose .*conv1"):
        unit_views(alex, "train", "fc7", out=tmp_path / "u", progress=False)


def test_units_tool_writes_filters_and_a_unit_sheet(small_voc, tmp_path):
    """The script, run in this process (a fresh interpreter would spend its time importing torch)."""
    import importlib.util

    import typer
    from typer.testing import CliRunner

    from patchnet.recipe import save_recipe

    spec = importlib.util.spec_from_file_location("units_tool", TOOLS / "units.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    app = typer.Typer()
    app.command()(tool.main)
    recipe = tmp_path / "tiny.yaml"
    save_recipe(tiny_recipe(tmp_path, small_voc), recipe)
    out = tmp_path / "units"
    r = CliRunner().invoke(
        app,
        [
            "--recipe",
            str(recipe),
            "--split",
            "train",
            "--limit",
            "3",
            "--layer",
            "stage3",
            "--channels",
            "4",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    filters = Image.open(out / "filters.png")
    assert filters.size == (6 * 39 + 3, 6 * 39 + 3)  # Lite0's 32 stem filters on a 6x6 grid
    sheet = Image.open(out / "units_stage3.png")
    assert sheet.size[0] > 4 * 3 * 64  # four 3x3 blocks of 64 px crops side by side
    assert sheet.size[1] > 3 * 64
    r = CliRunner().invoke(app, ["--recipe", str(recipe), "--split", "train", "--layer", "conv9"])
    assert r.exit_code == 2 and "has no stage 'conv9'" in r.output
