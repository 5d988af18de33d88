import numpy as np
import pytest

from patchnet.head.calibration import Calibration, best_threshold, calibrate, fit_platt


def test_platt_recovers_known_probabilities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    p = 1 / (1 + np.exp(-(2.0 * x - 1.0)))
    y = np.where(rng.random(len(x)) < p, 1, -1)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)


def test_power_scores_are_calibrated_on_their_log_and_label_zero_is_left_out():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5000, 2))
    truth = 1 / (1 + np.exp(-(1.5 * z + 0.5)))
    labels = np.where(rng.random(z.shape) < truth, 1, -1).astype(np.int8)
    labels[:100, 0] = 0  # difficult-only: must not move the fit
    scores = np.exp(z)  # a power mean is a tiny positive number whose log is what matters
    cal = calibrate(scores, labels, "power")
    got = cal.probabilities(scores)
    assert np.abs(got - truth).mean() < 0.02
    again = Calibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(again.probabilities(scores), got)


def test_best_threshold_maximises_f1_by_hand():
    probs = np.array([0.9, 0.8, 0.7, 0.4, 0.2])
    y = np.array([1, 1, -1, 1, -1])
    # cut after 2: F1 = 2*2/(2+3) = 0.8; after 4: 2*3/(4+3) = 0.857 (best); after 1: 0.5
    assert best_threshold(probs, y) == pytest.approx(0.3)


def test_a_class_without_held_out_positives_keeps_neutral_parameters():
    cal = calibrate(np.array([[0.1], [0.2]]), np.array([[-1], [-1]]), "max")
    assert cal.a.tolist() == [1.0] and cal.threshold.tolist() == [0.5]


def single_label(n=60, c=4, seed=0):
    """Scores of single-label images whose classes sit on different scales: class 0's scores are ten times the
    others', so per-class statistics of a few images reorder the classes."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, c, n)
    scores = rng.random((n, c)) * 0.5
    scores[np.arange(n), truth] += 0.6
    scores[:, 0] *= 10
    labels = np.where(np.eye(c, dtype=bool)[truth], 1, -1).astype(np.int8)
    return scores, labels


def test_a_shared_calibration_keeps_the_order_of_the_classes():
    scores, labels = single_label()
    shared = calibrate(scores, labels, "max", shared=True)
    assert np.ptp(shared.a) == 0 and np.ptp(shared.b) == 0 and shared.a[0] > 0
    probs = shared.probabilities(scores)
    assert (probs.argmax(1) == scores.argmax(1)).all()  # one increasing map: every image keeps its arg-max
    own = calibrate(scores, labels, "max").probabilities(scores)
    assert (own.argmax(1) != scores.argmax(1)).any()  # per-class maps reorder some images' classes
