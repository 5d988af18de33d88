import numpy as np
import pytest

from patchnet.infer import aggregate, aggregate_items, score_map


def test_power_k_mean_by_hand():
    probs = np.array([[0.5, 0.2, 0.3],   # two classes + background
                      [0.1, 0.8, 0.1],
                      [1.0, 0.0, 0.0]])
    got = aggregate(probs, k=5)
    want = [(0.5 ** 5 + 0.1 ** 5 + 1.0) / 3, (0.2 ** 5 + 0.8 ** 5 + 0.0) / 3]
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(aggregate(probs, k=1), [1.6 / 3, 1.0 / 3])
    assert got.shape == (2,)  # the background column is not scored


def test_larger_k_favours_a_few_confident_patches():
    one_sure = np.array([[0.95, 0.05]] + [[0.0, 1.0]] * 9)
    many_unsure = np.array([[0.3, 0.7]] * 10)
    assert aggregate(one_sure, 1)[0] < aggregate(many_unsure, 1)[0]
    assert aggregate(one_sure, 5)[0] > aggregate(many_unsure, 5)[0]


def test_aggregate_items_matches_per_item_aggregation():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=12)
    offsets = np.array([0, 5, 5, 12])  # the middle item has no patches
    got = aggregate_items(probs, offsets, 5)
    np.testing.assert_allclose(got[0], aggregate(probs[:5], 5))
    np.testing.assert_allclose(got[1], 0)
    np.testing.assert_allclose(got[2], aggregate(probs[5:], 5))


def test_score_map_mean_and_max_on_two_patches():
    # 6x4 image; patch A covers x in [0,4), patch B covers x in [2,6); both all rows
    boxes = np.array([[0, 0, 4, 4], [2, 0, 6, 4]], np.float32)
    values = np.array([0.2, 0.8])
    mean = score_map(boxes, values, 6, 4, "mean")
    np.testing.assert_allclose(mean[0], [0.2, 0.2, 0.5, 0.5, 0.8, 0.8])
    assert (mean == mean[0]).all()
    mx = score_map(boxes, values, 6, 4, "max")
    np.testing.assert_allclose(mx[0], [0.2, 0.2, 0.8, 0.8, 0.8, 0.8])


def test_score_map_uses_pixel_centres_and_leaves_uncovered_pixels_at_zero():
    boxes = np.array([[0.6, 0.4, 2.4, 1.6]], np.float32)
    m = score_map(boxes, np.array([1.0]), 4, 3, "mean")
    want = np.zeros((3, 4))
    want[0:2, 1] = 1.0  # only the centres (1.5, 0.5) and (1.5, 1.5) lie inside the box
    np.testing.assert_allclose(m, want)
    with pytest.raises(ValueError, match="mean' or 'max"):
        score_map(boxes, np.array([1.0]), 4, 3, "median")
