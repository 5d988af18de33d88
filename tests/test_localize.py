"""Boxes from patch scores, and the localisation metrics against hand-built cases and pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest

from patchnet.evaluation.localize import BoxOptionError, box_options, confidence, localize, map_regions
from patchnet.evaluation.metrics import box_iou, corloc_hits, detection_ap
from patchnet.recipe import InferConfig


def test_map_regions_are_the_connected_parts_above_the_threshold_peak_first():
    m = np.zeros((20, 30))
    m[2:6, 3:9] = 0.9  # the peak region
    m[10:18, 20:28] = 0.6
    m[15, 2] = 0.2  # under half the peak
    regions = map_regions(m, 0.5)
    assert regions == [((3.0, 2.0, 9.0, 6.0), 0.9), ((20.0, 10.0, 28.0, 18.0), 0.6)]
    assert map_regions(m, 0.7) == [((3.0, 2.0, 9.0, 6.0), 0.9)]
    assert map_regions(np.zeros((4, 4)), 0.5) == [] and map_regions(np.full((4, 4), 0.3), 0.5) == []


def test_map_regions_cut_between_the_maps_floor_and_its_peak():
    m = np.full((20, 30), 0.5)  # large patches that hold the object lift the whole map
    m[2:6, 3:9] = 0.9
    m[10:18, 20:28] = 0.6
    # half way from 0.5 to 0.9 is 0.7: only the peak region; a cut at half the peak (0.45) would take everything
    (region,) = map_regions(m, 0.5)
    assert region[0] == (3.0, 2.0, 9.0, 6.0) and region[1] == pytest.approx(0.4)
    assert [r[0] for r in map_regions(m, 0.2)] == [(3.0, 2.0, 9.0, 6.0), (20.0, 10.0, 28.0, 18.0)]


def test_localize_by_map_patch_and_whole_image():
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]], np.float32)
    values = np.array([[0.9, 0.1], [0.8, 0.1], [0.1, 0.2], [0.1, 0.7]])
    scores = np.log([0.8, 0.3])  # the log of the image's confidence in each class
    (cat,) = localize(boxes, values, scores, 20, 20, [0], "map", threshold=0.5)
    assert cat.box == (0.0, 0.0, 20.0, 10.0)  # the top row, where class 0 scores high
    assert cat.score == pytest.approx(0.8)  # the first box keeps the image's confidence
    (top,) = localize(boxes, values, scores, 20, 20, [1], "patch")
    assert top.box == (10.0, 10.0, 20.0, 20.0) and top.score == pytest.approx(0.3)
    (whole,) = localize(boxes, values, scores, 20, 20, [1], "whole")
    assert whole.box == (0.0, 0.0, 20.0, 20.0)
    with pytest.raises(ValueError, match="map, patch, whole"):
        localize(boxes, values, scores, 20, 20, [0], "grabcut")


def test_secondary_regions_rank_below_the_first_by_their_relative_peak():
    boxes = np.array([[0, 0, 10, 10], [30, 0, 40, 10]], np.float32)
    values = np.array([[1.0], [0.6]])
    first, second = localize(boxes, values, np.log([0.5]), 40, 10, [0], "map", threshold=0.5)
    assert first.box == (0.0, 0.0, 10.0, 10.0) and second.box == (30.0, 0.0, 40.0, 10.0)
    assert first.score == pytest.approx(0.5) and second.score == pytest.approx(0.5 * 0.6)


def test_box_scores_lie_in_0_1_whatever_the_caller_passes():
    boxes = np.array([[0, 0, 10, 10], [30, 0, 40, 10]], np.float32)
    values = np.array([[1.0], [0.6]])
    for score in (5.0, 0.0, -3.0, -1e6):  # a raw score above 0 counts as full confidence
        found = localize(boxes, values, np.array([score]), 40, 10, [0], "map", threshold=0.5)
        assert found and all(0.0 <= d.score <= 1.0 for d in found)
        assert found[0].score == pytest.approx(min(np.exp(score), 1.0))


def test_confidence_is_the_calibrated_probability_else_a_squashed_score():
    from patchnet.head.calibration import Calibration

    cal = Calibration("power", np.array([1.0, 2.0]), np.array([0.0, -1.0]), np.array([0.5, 0.5]))
    scores = np.array([0.05, 1e-4])
    assert np.allclose(confidence(scores, "power", 5.0, cal), cal.probabilities(scores))
    # the power-k mean of probabilities: its k-th root, the generalised mean, in [0, 1]
    assert np.allclose(confidence(np.array([0.0, 0.5**5, 1.0]), "power", 5.0), [0.0, 0.5, 1.0])
    # evidence poolings (logits) and fused scores: the logistic
    assert np.allclose(confidence(np.array([-2.0, 0.0, 3.0]), "max"), 1 / (1 + np.exp([2.0, 0.0, -3.0])))
    assert np.allclose(confidence(np.array([-2.0, 0.0]), "power", fused=True), 1 / (1 + np.exp([2.0, 0.0])))
    for pool in ("power", "max", "lse", "topk"):
        c = confidence(np.array([-1e9, -5.0, 0.0, 0.3, 7.0, 1e9]), pool)
        assert ((c >= 0) & (c <= 1)).all()


def test_iou_and_corloc_by_hand():
    assert box_iou([0, 0, 10, 10], [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]]).tolist() == [1 / 3, 1.0, 0.0]
    assert corloc_hits(np.array([0, 0, 10, 10]), np.array([[0, 0, 10, 20]]))  # IoU exactly 0.5 counts
    assert not corloc_hits(np.array([0, 0, 10, 10]), np.array([[0, 0, 10, 21]]))
    assert not corloc_hits(np.array([0, 0, 10, 10]), np.zeros((0, 4)))


def test_detection_ap_by_hand_with_a_difficult_box_and_a_duplicate():
    truth = {
        0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([False, True])),
        1: (np.array([[0, 0, 10, 10]]), np.array([False])),
    }
    detections = [
        (0, 0.9, np.array([0, 0, 10, 10])),  # true positive
        (0, 0.8, np.array([0, 0, 10, 10])),  # the same box again: a false positive
        (0, 0.7, np.array([20, 20, 30, 30])),  # on the difficult box: neither
        (1, 0.6, np.array([50, 50, 60, 60])),  # misses: a false positive
        (1, 0.5, np.array([1, 0, 10, 10])),  # IoU 0.9: a true positive
    ]
    ap07, ap = detection_ap(detections, truth)
    # precision/recall after each counted detection: (1, .5), (.5, .5), (1/3, .5), (.5, 1)
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert ap07 == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    assert np.isnan(detection_ap([], {0: (np.array([[0, 0, 1, 1]]), np.array([True]))})[0])


def test_detection_ap_matches_pycocotools_on_random_boxes(tmp_path):
    """Without difficult boxes, the VOC envelope AP and COCO's AP at IoU 0.5 (101 recall points) agree closely."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    images, anns, truth, dets = [], [], {}, []
    for i in range(40):
        images.append({"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.jpg"})
        gt = []
        for _ in range(rng.integers(1, 3)):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(15, 40, 2)
            gt.append([x, y, x + w, y + h])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        truth[i] = (np.array(gt), np.zeros(len(gt), bool))
        for box in gt:  # a jittered copy of each box, and a random one
            jitter = np.array(box) + rng.normal(0, 4, 4)
            dets.append((i, float(rng.uniform()), jitter))
        x, y = rng.uniform(0, 70, 2)
        dets.append((i, float(rng.uniform()), np.array([x, y, x + 25, y + 25])))
    (tmp_path / "gt.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]})
    )
    results = [
        {"image_id": i + 1, "category_id": 1, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
        for i, s, b in dets
    ]
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(results), "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
    ev.evaluate()
    ev.accumulate()
    coco_ap = float(ev.eval["precision"][0, :, 0, 0, 0].mean())
    _, ap = detection_ap(dets, truth, iou=0.5)
    assert ap == pytest.approx(coco_ap, abs=0.02) and 0.2 < ap < 0.95


def test_box_options_take_the_callers_else_the_recipes_and_are_checked():
    infer = InferConfig(box_method="patch", box_threshold=0.3)
    assert box_options(infer) == ("patch", 0.3)
    assert box_options(infer, "map", 0.0) == ("map", 0.0)  # a cut of 0 is the caller's, not "unset"
    with pytest.raises(BoxOptionError, match="one of"):
        box_options(infer, "boxes")
    with pytest.raises(BoxOptionError, match=r"\[0, 1\]"):
        box_options(InferConfig(box_method="map", box_threshold=1.5))
