import numpy as np
import pytest

from patchnet.evaluation.maps import score_map


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


def test_score_map_prior_pulls_thinly_covered_pixels_towards_the_image_mean():
    # pixel columns 0-1 are covered by one high patch only, columns 2-5 by three low ones
    boxes = np.array([[0, 0, 2, 2], [2, 0, 6, 2], [2, 0, 6, 2], [2, 0, 6, 2]], np.float32)
    values = np.array([0.9, 0.3, 0.3, 0.3])
    plain = score_map(boxes, values, 6, 2)
    assert plain[0, 0] == np.float32(0.9)
    mean = values.mean()  # 0.45
    shrunk = score_map(boxes, values, 6, 2, prior=2.0)
    np.testing.assert_allclose(shrunk[0, 0], (0.9 + 2 * mean) / 3, rtol=1e-6)
    np.testing.assert_allclose(shrunk[0, 3], (0.9 * 0 + 3 * 0.3 + 2 * mean) / 5, rtol=1e-6)


class _Store:
    """A one-image feature store whose feature rows are the head's logits (see _Identity)."""

    def __init__(self, boxes, logits):
        self.patch_boxes, self.rows = np.asarray(boxes, np.float32), np.asarray(logits, np.float32)
        self.offsets, self.record, self.view, self.ok = (
            np.array([0, len(boxes)]),
            np.array([0]),
            np.array([0]),
            np.array([True]),
        )

    def item_slice(self, i):
        return slice(0, len(self.patch_boxes))


class _Identity:
    num_classes = 2

    def logits(self, x):
        import torch

        return torch.as_tensor(np.asarray(x, np.float32))


def test_pointing_game_on_a_hand_built_image():
    from types import SimpleNamespace

    from patchnet.data import ImageRecord
    from patchnet.evaluation.maps import pointing_game

    quadrants = [[0, 0, 100, 100], [100, 0, 200, 100], [0, 100, 100, 200], [100, 100, 200, 200]]
    # logits for (class 0, class 1, background): both classes peak in the bottom-right quadrant
    logits = [[-5, -5, 0], [-5, -5, 0], [-5, -5, 0], [5, 5, 0]]
    rec = ImageRecord(
        "x",
        None,
        200,
        200,
        np.array([[120, 120, 180, 180], [0, 0, 60, 60]], np.float32),
        np.array([0, 1]),
        np.array([False, False]),
        np.array([1, 1], np.int8),
    )
    dataset = SimpleNamespace(records=[rec], classes=["a", "b"])
    result = pointing_game(_Identity(), _Store(quadrants, logits), dataset, np.array([0]), "max")
    # class 0's box lies within 15 px of the map's first maximum (100.5, 100.5)? No: 19.5 px away on each axis
    # -> a miss; move the box so that it is in reach, then it hits.
    assert result.hits.tolist() == [False, False] and result.centre.tolist() == [False, False]
    assert result.hard.tolist() == [True, True]  # small boxes, and another class present
    rec.boxes[0] = [110, 110, 180, 180]
    result = pointing_game(_Identity(), _Store(quadrants, logits), dataset, np.array([0]), "max")
    assert result.hits.tolist() == [True, False]
