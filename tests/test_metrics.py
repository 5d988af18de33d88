import logging

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from patchnet.evaluation.metrics import ap_table, mean_ap, voc_ap


def test_hand_computed_case():
    scores = [0.9, 0.8, 0.7, 0.6]
    labels = [1, -1, 1, -1]
    # P = 1 at R = 0.5, P = 2/3 at R = 1
    assert voc_ap(scores, labels, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert voc_ap(scores, labels, use_07_metric=False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_envelope_interpolates_a_later_higher_precision():
    # ranks: +, -, -, +, +  -> precision at positives 1, 1/2, 3/5; envelope lifts 1/2 to 3/5
    scores = [5, 4, 3, 2, 1]
    labels = [1, -1, -1, 1, 1]
    assert voc_ap(scores, labels, False) == pytest.approx((1 + 0.6 + 0.6) / 3)
    # 11-point: recall 1/3 reached at P=1 (t <= 0.3), then the best precision at recall >= t is 0.6
    assert voc_ap(scores, labels, True) == pytest.approx((4 * 1 + 7 * 0.6) / 11)


def test_recall_exactly_on_an_11_point_threshold_counts():
    # 10 positives: after 3 hits recall is exactly 0.3, and precision 1 must count at t = 0.3
    scores = np.arange(20, 0, -1)
    labels = np.array([1, 1, 1] + [-1] * 10 + [1] * 7)
    p_after = [(4 + i) / (14 + i) for i in range(7)]  # precision at hits 4..10
    want = (4 * 1.0 + sum(max(p_after[j:]) for j in range(7)) + 0) / 11
    # t = 0.4..1.0 are reached at hits 4..10, each taking the best precision at or after it
    assert voc_ap(scores, labels, True) == pytest.approx(want)


def test_perfect_and_worst_rankings():
    assert voc_ap([3, 2, 1], [1, 1, -1], True) == pytest.approx(1.0)
    assert voc_ap([3, 2, 1], [1, 1, -1], False) == pytest.approx(1.0)
    assert voc_ap([3, 2, 1], [-1, -1, 1], False) == pytest.approx(1 / 3)


def test_label_zero_is_left_out():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6]
    with_difficult = [0, 1, -1, 1, -1]
    without = [1, -1, 1, -1]
    for m in (True, False):
        assert voc_ap(scores, with_difficult, m) == pytest.approx(voc_ap(scores[1:], without, m))


def test_ties_do_not_depend_on_order():
    scores = np.array([0.5, 0.5, 0.5, 0.2])
    a = voc_ap(scores, [1, -1, -1, 1], False)
    b = voc_ap(scores, [-1, -1, 1, 1], False)
    assert a == pytest.approx(b)
    # the tie is one threshold: P = 1/3 at R = 1/2, then P = 1/2 at R = 1; the envelope lifts 1/3
    assert a == pytest.approx(0.5)
    # where ties keep precision monotone, sklearn (which also groups ties) agrees
    assert voc_ap(scores, [1, 1, -1, -1], False) == pytest.approx(average_precision_score([1, 1, 0, 0], scores))


def test_all_negative_class_is_undefined_and_left_out_of_the_mean(caplog):
    assert np.isnan(voc_ap([0.3, 0.2], [-1, -1]))
    assert np.isnan(voc_ap([0.3, 0.2], [0, -1]))
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        m = mean_ap(np.array([0.5, np.nan, 1.0]), ["a", "b", "c"])
    assert m == pytest.approx(0.75)
    assert "b" in caplog.text and "undefined" in caplog.text


def test_a_class_with_positives_never_gives_nan():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        labels = rng.choice([-1, 0, 1], n)
        labels[rng.integers(n)] = 1
        for m in (True, False):
            ap = voc_ap(rng.random(n), labels, m)
            assert 0 < ap <= 1


def _monotone_case(rng, npos):
    """Scores and labels whose precision only falls: the gaps between positives never shrink."""
    gaps = np.sort(rng.integers(1, 6, npos))
    positions = np.cumsum(gaps) - 1
    n = positions[-1] + 1 + int(rng.integers(0, 10))
    labels = -np.ones(n, int)
    labels[positions] = 1
    scores = np.sort(rng.random(n))[::-1]
    return scores, labels


def test_envelope_ap_equals_sklearn_when_precision_is_monotone():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scores, labels = _monotone_case(rng, int(rng.integers(1, 20)))
        perm = rng.permutation(len(scores))  # input order must not matter
        ours = voc_ap(scores[perm], labels[perm], use_07_metric=False)
        assert ours == pytest.approx(average_precision_score(labels == 1, scores))


def test_envelope_ap_on_random_data_against_sklearn_curve():
    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(5, 60))
        labels = np.where(rng.random(n) < 0.4, 1, -1)
        labels[0] = 1
        scores = np.round(rng.random(n), 2)  # with ties
        precision, recall, _ = precision_recall_curve(labels == 1, scores)
        # sklearn lists recall descending; take the envelope and integrate by hand
        envelope = np.maximum.accumulate(precision)
        want = np.sum(-np.diff(recall) * envelope[:-1])
        assert voc_ap(scores, labels, False) == pytest.approx(want)
        # the envelope AP is never below sklearn's uninterpolated AP
        assert voc_ap(scores, labels, False) >= average_precision_score(labels == 1, scores) - 1e-12


def test_weighted_ap_is_the_ap_of_the_images_repeated_as_often_as_their_weights():
    # the bootstrap's resamples (benchmarks/heldout.py): ties, difficult images, draws without positives
    rng = np.random.default_rng(3)
    n = 40
    scores = rng.integers(0, 12, n).astype(float)  # many ties
    labels = rng.choice([1, -1, -1, 0], n)
    draws = rng.integers(0, n, (200, n))
    draws[0] = np.flatnonzero(labels != 1)[0]  # one draw of a single negative image: no positive
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])
    weighted = voc_ap(scores, labels, weights=counts)
    expected = np.array([voc_ap(scores[d], labels[d]) for d in draws])
    assert weighted.shape == (200,)
    np.testing.assert_allclose(weighted, expected, rtol=1e-12)  # NaN where NaN
    assert np.isnan(weighted[0])
    for d, c in zip(draws[1:20], counts[1:20], strict=True):  # one row: both metrics
        for metric in (True, False):
            assert voc_ap(scores, labels, metric, weights=c) == pytest.approx(voc_ap(scores[d], labels[d], metric))
    with pytest.raises(ValueError, match="11-point"):
        voc_ap(scores, labels, False, weights=counts)
    with pytest.raises(ValueError, match="weights must be"):
        voc_ap(scores, labels, weights=counts[:, :-1])


def test_ap_table_and_format():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.3]])
    labels = np.array([[1, -1], [-1, 1], [0, -1]])
    table = ap_table(scores, labels, ["x", "y"])
    assert table.ap07.tolist() == pytest.approx([1.0, 1.0])
    assert table.map == pytest.approx(1.0)
    text = table.format()
    assert "mAP" in text and "100.0" in text
    assert table.to_dict()["classes"]["y"]["ap"] == 1.0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="length"):
        voc_ap([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="1, -1 or 0"):
        voc_ap([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        voc_ap([np.nan, 0.2], [1, -1])


def test_accuracy_and_mean_per_class_accuracy_by_hand():
    from patchnet.evaluation.metrics import accuracy

    labels = np.array([[1, -1], [1, -1], [1, -1], [-1, 1]])
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.6]])
    top1, per_class = accuracy(scores, labels)
    assert top1 == 0.75 and per_class == pytest.approx((2 / 3 + 1) / 2)
    t = ap_table(scores, labels, ["a", "b"], single_label=True)
    assert t.top1 == 0.75 and "mean per-class accuracy 83.3" in t.format()


def test_pointing_hits_within_tolerance_and_union_fraction():
    from patchnet.evaluation.metrics import PointingResult, point_hits, union_fraction

    box = np.array([[10, 10, 20, 20]])
    assert point_hits(15, 15, box) and point_hits(34, 15, box) and not point_hits(36, 15, box)
    assert point_hits(20 + 10, 20 + 10, box) and not point_hits(20 + 11, 20 + 11, box)  # diagonal distance
    assert union_fraction(np.array([[0, 0, 5, 10], [2, 0, 5, 10]]), 10, 10) == 0.5
    r = PointingResult(np.array([True, False, True]), np.array([False, False, True]), np.array([True, True, False]))
    rates = r.rates()
    assert rates["all"] == pytest.approx(2 / 3) and rates["hard"] == 0.5 and rates["hard_centre"] == 0.0
