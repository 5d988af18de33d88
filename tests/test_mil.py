"""The detection head (patchnet.head.mil) and its candidate regions (patchnet.patches.regions)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from patchnet.backbones import build_backbone
from patchnet.backbones.regions import region_mean
from patchnet.head.mil import (
    MILHead,
    frame_means,
    image_regions,
    mil_loss,
    nms_detections,
    pseudo_labels,
    wsddn_loss,
)
from patchnet.patches.grid import patch_grid
from patchnet.patches.regions import region_boxes, region_levels
from patchnet.recipe import DetectorConfig

SCALES = [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0]


def test_square_regions_are_the_papers_patches():
    squares = region_boxes(500, 375, SCALES, 1 / 3, ratios=(1.0,))
    grid = patch_grid(500, 375, SCALES, 1 / 3)
    assert {tuple(np.round(b, 2)) for b in squares} == {tuple(np.round(b, 2)) for b in grid}


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (40, 300), (64, 64)])
def test_regions_lie_inside_the_image_with_their_aspect_ratios(size):
    w, h = size
    boxes = region_boxes(w, h, SCALES, 0.5, ratios=(1.0, 0.5, 2.0, 1 / 3, 3.0))
    assert len(np.unique(np.round(boxes, 2), axis=0)) == len(boxes)  # no duplicates
    assert (boxes[:, :2] >= -1e-4).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    small = region_boxes(w, h, [2.0, 3.0, 4.0], 0.5, ratios=(1.0, 0.5, 2.0, 1 / 3, 3.0))
    ratio = (small[:, 2] - small[:, 0]) / (small[:, 3] - small[:, 1])
    if w == h:  # from scale sqrt(3) on, no side is cut: exactly the five ratios
        assert np.allclose(np.unique(np.round(ratio, 3)), sorted([1 / 3, 0.5, 1.0, 2.0, 3.0]), atol=1e-3)


def test_regions_pool_from_the_level_nearest_their_size():
    boxes = np.array([[0, 0, 260, 260], [0, 0, 130, 130], [0, 0, 80, 90], [0, 0, 520, 130]], np.float32)
    # levels rescaling the image by 1, 2 and 3: a 260-pixel square is the trunk's input at level 0, a 130-pixel
    # one at level 1; an 85-pixel one is nearest level 2; a 520 x 130 rectangle has the area of a 260 square
    assert region_levels(boxes, [1.0, 2.0, 3.0], 260).tolist() == [0, 1, 2, 0]


def test_wsddn_image_score_by_hand():
    """Two regions, two classes, hidden = identity: region scores softmax(classes) x softmax(regions)."""
    head = MILHead(2, 2, hidden=2, refinements=0)
    with torch.no_grad():
        head.cls.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.cls.bias.zero_()
        head.det.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
        head.det.bias.zero_()
    with torch.no_grad():
        out = head(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    e = np.e
    cls = np.array([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]])  # softmax over the classes
    det = np.array([[e**2 / (e**2 + 1), 0.5], [1 / (e**2 + 1), 0.5]])  # softmax over the regions
    np.testing.assert_allclose(out.region_scores.numpy(), cls * det, rtol=1e-6)
    np.testing.assert_allclose(out.image_scores.numpy(), (cls * det).sum(0), rtol=1e-6)
    labels = torch.tensor([1.0, -1.0])
    expected = -np.log((cls * det).sum(0)[0]) - np.log(1 - (cls * det).sum(0)[1])
    assert float(wsddn_loss(out.image_scores, labels)) == pytest.approx(expected, rel=1e-5)
    assert float(wsddn_loss(out.image_scores, torch.tensor([1.0, 0.0]))) == pytest.approx(
        -np.log((cls * det).sum(0)[0]), rel=1e-5
    )  # 0: a class known only from difficult boxes is left out


def test_pseudo_labels_on_a_built_example():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [52, 50, 62, 60], [100, 0, 110, 10]], dtype=torch.float32
    )
    scores = torch.tensor(
        [[0.9, 0.0, 0.1], [0.5, 0.0, 0.1], [0.1, 0.0, 0.7], [0.1, 0.0, 0.2], [0.2, 0.0, 0.3]], dtype=torch.float32
    )
    labels = torch.tensor([1.0, -1.0, 1.0])  # classes 0 and 2 present; their top regions are 0 and 2
    targets, weights = pseudo_labels(boxes, scores, labels, iou=0.5)
    # region 1 overlaps region 0 at IoU 9/11, region 3 overlaps region 2 at 8/12; region 4 overlaps neither
    assert targets.tolist() == [0, 0, 2, 2, 3]
    np.testing.assert_allclose(weights.numpy(), [0.9, 0.9, 0.7, 0.7, 0.9])  # the background takes its nearest top's
    targets, weights = pseudo_labels(boxes, scores, torch.tensor([-1.0, -1.0, 0.0]))
    assert targets.tolist() == [3] * 5 and float(weights.sum()) == 0  # no class present: nothing to learn


def test_refinement_loss_trains_toward_the_pseudo_labels():
    torch.manual_seed(0)
    head = MILHead(4, 2, hidden=4, refinements=2)
    x = torch.randn(6, 4)
    boxes = torch.tensor([[0, 0, 10, 10]] * 3 + [[40, 40, 50, 50]] * 3, dtype=torch.float32)
    labels = torch.tensor([1.0, -1.0])
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(50):
        loss = mil_loss(head(x), boxes, labels)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    with torch.no_grad():
        image = head(x).image_scores
    assert float(image[0]) > 0.9 and float(image[1]) < 0.1


def test_class_wise_nms_matches_torchvision():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (60, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (60, 3)).astype(np.float32)
    got = nms_detections(boxes, scores, range(3), iou=0.4, max_boxes=1000, min_score=0.0)
    b = torch.from_numpy(boxes).repeat(3, 1)
    s = torch.from_numpy(scores.T.ravel().copy())
    idx = torch.arange(3).repeat_interleave(60)
    keep = batched_nms(b, s, idx, 0.4)
    expected = sorted((int(idx[k]), round(float(s[k]), 6)) for k in keep)
    assert sorted((c, round(score, 6)) for c, _, score in got) == expected
    capped = nms_detections(boxes, scores, [1], iou=0.4, max_boxes=3, min_score=0.0)
    assert [round(x[2], 6) for x in capped] == [e[1] for e in sorted(expected, key=lambda t: -t[1]) if e[0] == 1][:3]


def test_hidden_is_fca_of_the_region_mean():
    """FCa is linear before its ReLU, so pooling its products per cell equals FCa on the pooled map: exactly."""
    torch.manual_seed(0)
    head = MILHead(8, 3, hidden=5)
    maps = [np.random.default_rng(1).random((4, 6, 8)).astype(np.float32)]
    regions = image_regions(maps, np.array([[1.0, 1.0]]), 6, 4, DetectorConfig(scales=[1.0, 2.0]), 1.0, 0.0, 4)
    got = head.hidden(regions.maps, regions.cells)
    fmap = torch.from_numpy(maps[0]).permute(2, 0, 1)[None]
    expected = F.relu(head.fca(region_mean(fmap, regions.cells[0])))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_region_features_match_cropping_the_image_and_running_the_trunk():
    """Regions pooled from the map of the whole image against the trunk run on each region alone.

    The convolutions see context outside a region in the first, so the features differ: the tolerance is
    that of shared mode's own squares on the same image (rectangles pool no worse than squares, to 0.03 in
    median cosine; both about 0.67 on this texture, whose small crops lose most of their context), and a floor of 0.6.
    """
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=64)
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.random((1, 3, 12, 16)).astype(np.float32))
    img = F.interpolate(small, size=(192, 256), mode="bicubic", align_corners=False).clamp(0, 1)  # a smooth texture

    def cosines(boxes):
        with torch.no_grad():
            fmap = backbone.feature_map(img)
            shared = region_mean(fmap, boxes / backbone.stride)
            alone = torch.stack(
                [
                    backbone.feature_map(img[..., int(y1) : int(y2), int(x1) : int(x2)]).mean((0, 2, 3))
                    for x1, y1, x2, y2 in boxes.tolist()
                ]
            )
        return F.cosine_similarity(shared, alone, dim=1)

    squares = torch.from_numpy(region_boxes(256, 192, [1.0, 1.5, 2.0], 0.5, ratios=(1.0,)))
    rectangles = torch.from_numpy(region_boxes(256, 192, [1.0, 1.5, 2.0], 0.5, ratios=(0.5, 2.0)))
    square, rect = float(cosines(squares).median()), float(cosines(rectangles).median())
    assert rect > square - 0.03 and rect > 0.6, (square, rect)


DETECTOR = ("train.detector=mil", "detector.epochs=2", "detector.image_batch=2", "detector.scales=[1.0, 2.0]")


def test_a_run_with_a_detector_trains_it_and_every_box_path_uses_it(tmp_path, small_voc):
    from patchnet.api import load
    from patchnet.checkpoint import load_checkpoint
    from patchnet.evaluation.localize import BoxOptionError
    from patchnet.training.trainer import train

    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, small_voc, "train.supervision=images", "pool.name=topk", *DETECTOR)
    train(recipe, progress=False)
    for name in ("best.pt", "last.pt"):
        detector = load_checkpoint(recipe.run_dir / name).detector
        assert detector is not None and len(detector["loss"]) == 2 and detector["input_size"] == 32
    model = load(recipe.run_dir / "last.pt")
    image = small_voc / "JPEGImages" / "e.jpg"
    boxes = model.localize(image, classes=["cat", "dog"])  # auto: the detection head
    assert {d.class_index for d in boxes} == {0, 1} and len(boxes) <= 10  # at most 5 a class, as the map gives
    assert all(0 <= d.score <= 1 and 0 <= d.box[0] < d.box[2] <= 88 and 0 <= d.box[1] < d.box[3] <= 66 for d in boxes)
    mapped = model.localize(image, classes=["cat"], method="map")  # the score maps stay one method away
    assert mapped and all(d.class_index == 0 for d in mapped)
    # the trunk runs once a level for the scores and the boxes: the boxes as from maps computed apart
    backbone, calls = model.predictor.extractor.backbone, []
    feature_map = backbone.feature_map
    backbone.feature_map = lambda *a, **k: calls.append(1) or feature_map(*a, **k)
    explained = model.explain(image, classes=["cat", "dog"])
    levels = len(model.predictor.extractor.plan(88, 66).levels)
    assert len(calls) == levels
    apart = model.predictor.detect(explained.image, [0, 1])  # its own trunk passes
    assert len(calls) == 2 * levels
    assert explained.boxes
    assert [(d.class_index, d.score) for d in explained.boxes] == [(c, pytest.approx(s)) for c, _, s in apart]
    np.testing.assert_allclose([d.box for d in explained.boxes], [b for _, b, _ in apart], atol=1e-4)
    from typer.testing import CliRunner

    from patchnet.cli import app

    runner = CliRunner()
    last = str(recipe.run_dir / "last.pt")
    result = runner.invoke(app, ["eval", "-c", last, "--split", "val", "--localize", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert "boxes: mil" in result.output and "CorLoc" in result.output
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "-c", last, str(image), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "boxes" / "e.png").is_file() and "images with boxes" in result.output
    written = json.loads((out / "predictions.json").read_text())["outputs"][str(image)]
    assert written["boxes"] == "boxes/e.png" and written["detections"]
    plain = tiny_recipe(tmp_path / "plain", small_voc)
    train(plain, progress=False)
    with pytest.raises(BoxOptionError, match="no detection head|has none"):
        load(plain.run_dir / "last.pt").localize(image, method="mil")


def test_the_detector_needs_shared_mode_maps_and_unprojected_features(tmp_path, small_voc):
    from patchnet.errors import PatchnetError
    from patchnet.recipe import RecipeError
    from patchnet.training.trainer import train

    from conftest import tiny_recipe

    with pytest.raises(RecipeError, match="cache.compress"):
        tiny_recipe(tmp_path, small_voc, "cache.compress=pca", *DETECTOR)
    with pytest.raises(PatchnetError, match="patches.mode: shared"):
        train(tiny_recipe(tmp_path, small_voc, "patches.mode=exact", *DETECTOR), progress=False)


def test_frame_means_by_hand():
    """A box grown twice about its centre, less the box: the mean of the cells of the ring; a box that fills the
    map has no frame and keeps its own mean."""
    fmap = torch.from_numpy(np.random.default_rng(2).random((1, 3, 10, 12)).astype(np.float32))
    cells = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 12.0, 10.0]])
    inner = region_mean(fmap, cells)
    got = frame_means(fmap, cells, inner, 2.0)
    ring = torch.zeros(10, 12, dtype=torch.bool)
    ring[0:8, 0:8] = True
    ring[2:6, 2:6] = False
    torch.testing.assert_close(got[0], fmap[0][:, ring].mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], inner[1])


def test_context_scores_a_region_against_its_frame():
    """With context, the detection stream's logit is the region's less its frame's (shared weights): a region whose
    frame looks like it scores no higher than any other."""
    head = MILHead(2, 1, hidden=2, refinements=0, context=1.8)
    with torch.no_grad():
        head.det.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.cls.weight.zero_()
    regions = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    frames = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # the first region's frame is as strong as it
    with torch.no_grad():
        out = head(torch.cat([regions, frames]))
    det = torch.tensor([0.0, 3.0, 0.0]).softmax(0)
    torch.testing.assert_close(out.region_scores[:, 0], det)  # one class: its softmax over classes is 1
