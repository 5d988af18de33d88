import numpy as np
import pytest

from patchnet.patches.grid import grid_by_scale, patch_grid
from patchnet.patches.labels import IGNORE, MULTI, label_counts, label_patches
from patchnet.recipe import PAPER_SCALES


def test_grid_on_a_typical_voc_image_has_about_500_patches():
    boxes = patch_grid(500, 375)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    assert 450 <= len(boxes) <= 550
    assert 250 <= len(patch_grid(500, 375, step=0.5)) <= 300  # the paper's s/2 step gives about 275


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 500), (640, 480), (100, 100), (37, 201)])
def test_grid_patches_are_square_inside_and_sized_by_scale(size):
    w, h = size
    for g in grid_by_scale(w, h):
        side = min(w, h) / g.scale
        np.testing.assert_allclose(g.boxes[:, 2] - g.boxes[:, 0], side, rtol=1e-5)
        np.testing.assert_allclose(g.boxes[:, 3] - g.boxes[:, 1], side, rtol=1e-5)
        assert g.boxes[:, :2].min() >= 0
        assert g.boxes[:, 2].max() <= w + 1e-3 and g.boxes[:, 3].max() <= h + 1e-3
    assert [g.scale for g in grid_by_scale(w, h)] == PAPER_SCALES


@pytest.mark.parametrize("step", [1 / 3, 0.5, 0.25])
def test_neighbours_overlap_by_at_least_half_and_last_patch_snaps_to_border(step):
    w, h = 500, 375
    for g in grid_by_scale(w, h, step=step):
        xs, ys = np.unique(g.boxes[:, 0]), np.unique(g.boxes[:, 1])
        for pos, length in ((xs, w), (ys, h)):
            # first at 0, last snapped to the border, gaps at most half the side
            assert pos[0] == 0
            assert pos[-1] + g.side == pytest.approx(length, abs=1e-3)
            if len(pos) > 1:
                assert np.diff(pos).max() <= 0.5 * g.side + 1e-3
                assert np.diff(pos)[:-1].max(initial=0) <= step * g.side + 1e-3
                assert np.diff(pos)[-1] <= step * g.side * 1.002
        # a regular grid: every (x, y) combination present
        assert len(g.boxes) == len(xs) * len(ys)


def test_grid_stride_is_regular_before_the_snapped_patch():
    g = grid_by_scale(500, 375, scales=[4.0], step=1 / 3)[0]
    xs = np.unique(g.boxes[:, 0])
    np.testing.assert_allclose(np.diff(xs[:-1]), g.side / 3, rtol=1e-5)
    assert xs[-1] - xs[-2] <= g.side / 3 + 1e-3


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        patch_grid(100, 100, step=0.6)
    with pytest.raises(ValueError, match=">= 1"):
        patch_grid(100, 100, scales=[0.5])
    with pytest.raises(ValueError, match="positive"):
        patch_grid(0, 100)


def lab(patches, boxes, classes, difficult=None, num_classes=3, image_labels=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return label_patches(
        np.asarray(patches, np.float32), boxes, np.asarray(classes), difficult, num_classes, image_labels=image_labels
    )


def test_one_object_rules_i_and_ii():
    box = [20, 20, 60, 60]  # area 1600
    patches = [
        [20, 20, 60, 60],  # identical: positive
        [0, 0, 100, 100],  # contains the box, but |P∩B| = 1600 < 0.2 * 10000: background
        [10, 10, 90, 90],  # 1600 >= 0.2 * 6400 and covers the whole box: positive
        [36, 20, 76, 60],  # sees 24/40 = 0.6 of the box exactly: positive
        [37, 20, 77, 60],  # sees 23/40 < 0.6: background
        [200, 200, 240, 240],  # far away: background
    ]
    assert lab(patches, [box], [1]).tolist() == [1, 3, 1, 1, 3, 3]


def test_two_objects_in_one_patch_are_ignored():
    boxes = [[10, 10, 40, 40], [50, 10, 80, 40]]
    patches = [[0, 0, 90, 50], [5, 5, 45, 45], [45, 5, 85, 45]]
    assert lab(patches, boxes, [0, 2]).tolist() == [IGNORE, 0, 2]


def test_two_objects_of_the_same_class_are_still_ignored():
    boxes = [[10, 10, 40, 40], [50, 10, 80, 40]]
    assert lab([[0, 0, 90, 50]], boxes, [1, 1]).tolist() == [IGNORE]


def test_tiny_box_fails_rule_i():
    # the patch holds the whole 5x5 box, but the box is far below 20% of the patch
    assert lab([[0, 0, 50, 50]], [[10, 10, 15, 15]], [0]).tolist() == [3]
    # a patch tight around the tiny box is positive
    assert lab([[9, 9, 16, 16]], [[10, 10, 15, 15]], [0]).tolist() == [0]


def test_patch_inside_a_big_box_fails_rule_ii():
    big = [[0, 0, 400, 300]]
    # fully inside: |P∩B| = |P| passes (i), but is 2500 < 0.6 * 120000
    assert lab([[100, 100, 150, 150]], big, [2]).tolist() == [3]


def test_difficult_objects_never_make_positives():
    boxes = [[10, 10, 40, 40], [100, 100, 140, 140]]
    patches = [[10, 10, 40, 40], [100, 100, 140, 140], [0, 0, 150, 150]]
    out = lab(patches, boxes, [0, 1], difficult=[True, False])
    # positive only for the difficult object -> ignored; the normal object stays positive;
    # the large patch matches neither (rule i fails for both) -> background
    assert out.tolist() == [IGNORE, 1, 3]


def test_patch_matching_a_normal_and_a_difficult_object_is_ignored():
    boxes = [[10, 10, 40, 40], [45, 10, 75, 40]]
    out = lab([[5, 5, 80, 45]], boxes, [0, 1], difficult=[False, True])
    assert out.tolist() == [IGNORE]


def test_class_present_without_a_box_turns_background_into_ignore():
    patches = [[20, 20, 60, 60], [200, 200, 240, 240]]
    boxes = [[20, 20, 60, 60]]
    labels_present = np.array([-1, 1, 1], np.int8)  # class 2 is present per the lists, but has no box
    assert lab(patches, boxes, [1], image_labels=labels_present).tolist() == [1, IGNORE]
    # difficult-only (0) also counts as present
    assert lab(patches, boxes, [1], image_labels=np.array([-1, 1, 0], np.int8)).tolist() == [1, IGNORE]
    # consistent lists keep the background
    assert lab(patches, boxes, [1], image_labels=np.array([-1, 1, -1], np.int8)).tolist() == [1, 3]


def test_image_without_boxes_is_all_background():
    out = lab(patch_grid(100, 80), np.zeros((0, 4)), np.zeros(0, np.int64))
    assert (out == 3).all()


def _reference_labels(patches, boxes, classes, difficult, num_classes):
    """The paper's rules written as plain loops."""
    out = []
    for p in patches:
        pa = (p[2] - p[0]) * (p[3] - p[1])
        hits = []
        for b, c, d in zip(boxes, classes, difficult):
            iw = max(0.0, min(p[2], b[2]) - max(p[0], b[0]))
            ih = max(0.0, min(p[3], b[3]) - max(p[1], b[1]))
            inter, ba = iw * ih, (b[2] - b[0]) * (b[3] - b[1])
            if inter >= 0.2 * pa and inter >= 0.6 * ba:
                hits.append((c, d))
        if not hits:
            out.append(num_classes)
        elif len(hits) > 1 or hits[0][1]:
            out.append(IGNORE)
        else:
            out.append(hits[0][0])
    return np.array(out)


def test_vectorised_labels_match_the_rules_written_as_loops():
    rng = np.random.default_rng(0)
    for trial in range(20):
        w, h = int(rng.integers(80, 400)), int(rng.integers(80, 400))
        patches = patch_grid(w, h)
        k = int(rng.integers(1, 6))
        xy = rng.uniform(0, 1, (k, 2)) * [w, h]
        wh = rng.uniform(0.02, 0.9, (k, 2)) * [w, h]
        boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
        classes = rng.integers(0, 4, k)
        difficult = rng.random(k) < 0.2
        got = label_patches(patches, boxes, classes, difficult, 4)
        want = _reference_labels(patches.astype(np.float64), boxes.astype(np.float64), classes, difficult, 4)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def test_label_counts():
    counts = label_counts(np.array([0, 0, 2, 3, IGNORE, 3]), 3)
    assert counts.tolist() == [2, 0, 1, 2, 1]


def test_a_rounded_step_gives_the_same_grid_as_a_third():
    for w, h in [(500, 375), (500, 250), (333, 500), (640, 480)]:
        a, b = patch_grid(w, h, step=1 / 3), patch_grid(w, h, step=0.3333)
        assert len(a) == len(b)
        np.testing.assert_allclose(a, b, atol=0.5)


def test_multilabel_keeps_a_patch_of_two_classes_with_both_targets():
    boxes = np.array([[10, 10, 40, 40], [50, 10, 80, 40], [100, 10, 130, 40]], np.float32)
    classes, difficult = np.array([0, 2, 2]), np.zeros(3, bool)
    patches = np.array(
        [
            [0, 0, 90, 50],  # cat + person: MULTI with both targets
            [45, 0, 135, 50],  # two persons: that class
            [5, 5, 45, 45],
        ],
        np.float32,
    )  # one cat
    labels, targets = label_patches(patches, boxes, classes, difficult, 3, multilabel=True)
    assert labels.tolist() == [MULTI, 2, 0]
    assert targets[0].tolist() == [True, False, True]
    # the default keeps the paper's rule (iii): both multi-object patches are ignored
    assert label_patches(patches, boxes, classes, difficult, 3).tolist() == [IGNORE, IGNORE, 0]
    # a difficult object among the matches still makes the patch ignored
    labels, _ = label_patches(patches, boxes, classes, np.array([False, True, False]), 3, multilabel=True)
    assert labels[0] == IGNORE
