import numpy as np
import pytest

from patchnet.fusion import FUSION_WEIGHTS, Fusion, fit_fusion
from patchnet.metrics import voc_ap


def _held_out(seed=0, n=80, c=4, d=6):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, c)) < 0.3, 1, -1)
    labels[:2] = 1  # every class has positives
    head = rng.random((n, c)) + 0.3 * (labels == 1)
    pooled = rng.random((n, d)).astype(np.float32)
    coef, intercept = rng.normal(size=(c, d)), rng.normal(size=c)
    return head, pooled, labels, coef, intercept


def _class_ap(fusion, head, pooled, labels, c):
    return voc_ap(fusion.combine(head, fusion.decision(pooled))[:, c], labels[:, c])


def test_shared_weight_is_the_best_of_the_grid_by_held_out_map():
    head, pooled, labels, coef, intercept = _held_out()
    fusion, tried = fit_fusion("power", coef, intercept, head, pooled, labels)
    assert set(tried) == set(FUSION_WEIGHTS)
    assert np.isscalar(fusion.weight) and tried[fusion.weight] == max(tried.values())
    brute = {}
    for w in FUSION_WEIGHTS:
        f = Fusion(**{**fusion.__dict__, "weight": w})
        brute[w] = np.mean([_class_ap(f, head, pooled, labels, c) for c in range(labels.shape[1])])
    assert brute == pytest.approx(tried)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unshrunk_class_weights_are_each_class_best(seed):
    head, pooled, labels, coef, intercept = _held_out(seed)
    shared, _ = fit_fusion("power", coef, intercept, head, pooled, labels)
    own, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=0.0)
    assert own.weight.shape == (labels.shape[1],)
    for c in range(labels.shape[1]):
        aps = {w: _class_ap(Fusion(**{**own.__dict__, "weight": w}), head, pooled, labels, c) for w in FUSION_WEIGHTS}
        assert aps[own.weight[c]] == max(aps.values())
        best = [w for w, a in aps.items() if a == max(aps.values())]
        # ties go to the weight nearest the shared one
        assert abs(own.weight[c] - shared.weight) == min(abs(w - shared.weight) for w in best)


def test_shrinking_moves_each_class_weight_towards_the_shared_one_by_its_positives():
    head, pooled, labels, coef, intercept = _held_out(3)
    shared, _ = fit_fusion("power", coef, intercept, head, pooled, labels)
    own, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=0.0)
    shrunk, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=10.0)
    n = (labels == 1).sum(0)
    np.testing.assert_allclose(shrunk.weight, (n * own.weight + 10 * shared.weight) / (n + 10))
    flat, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=1e12)
    np.testing.assert_allclose(flat.weight, shared.weight)


def test_class_weights_survive_the_checkpoint_dict():
    head, pooled, labels, coef, intercept = _held_out()
    fusion, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=5.0)
    back = Fusion.from_dict(fusion.to_dict())
    np.testing.assert_array_equal(back.weight, fusion.weight)
    np.testing.assert_allclose(back.combine(head, back.decision(pooled)), fusion.combine(head, fusion.decision(pooled)))
