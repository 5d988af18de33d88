import numpy as np
import pytest

from patchnet.evaluation.metrics import voc_ap
from patchnet.head.fusion import FUSION_WEIGHTS, Fusion, fit_fusion


def _held_out(seed=0, n=120, c=5, d=8):
    """Held-out scores where the max-pool SVM helps class 0 a lot, class 1 not at all and class 2 some; class 3
    has no positive and class 4's decision is constant (every weight ties on it)."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, c)) < 0.3, 1, -1)
    labels[:3, :4] = 1
    labels[:, 3] = -1
    pos = (labels == 1).astype(float)
    head = rng.random((n, c)) + 0.6 * pos
    pooled = rng.random((n, d)).astype(np.float32)
    pooled[:, :3] += (pos[:, :3] * [1.5, 0.1, 0.6]).astype(np.float32)
    coef, intercept = np.zeros((c, d)), rng.normal(size=c)
    coef[:3, :3] = np.eye(3)
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
        brute[w] = np.nanmean([_class_ap(f, head, pooled, labels, c) for c in range(labels.shape[1])])
    assert brute == pytest.approx(tried)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unshrunk_class_weights_are_each_class_best(seed):
    head, pooled, labels, coef, intercept = _held_out(seed)
    shared, _ = fit_fusion("power", coef, intercept, head, pooled, labels)
    own, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=0.0)
    assert 0 < shared.weight < max(FUSION_WEIGHTS)  # inside the grid, so "nearest the shared one" means something
    assert own.weight.shape == (labels.shape[1],) and len(set(own.weight)) > 1
    for c in (0, 1, 2):
        aps = {w: _class_ap(Fusion(**{**own.__dict__, "weight": w}), head, pooled, labels, c) for w in FUSION_WEIGHTS}
        best = [w for w, a in aps.items() if a == max(aps.values())]
        # ties go to the weight nearest the shared one
        assert own.weight[c] in best
        assert abs(own.weight[c] - shared.weight) == min(abs(w - shared.weight) for w in best)
    # no held-out positive (no AP), and a tie on every weight: the shared weight
    assert own.weight[3] == shared.weight and own.weight[4] == shared.weight


def test_shrinking_moves_each_class_weight_towards_the_shared_one_by_its_positives():
    head, pooled, labels, coef, intercept = _held_out(0)
    shared, _ = fit_fusion("power", coef, intercept, head, pooled, labels)
    own, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=0.0)
    shrunk, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=10.0)
    assert (own.weight != shared.weight).any()
    n = (labels == 1).sum(0)
    np.testing.assert_allclose(shrunk.weight, (n * own.weight + 10 * shared.weight) / np.maximum(n + 10, 1))
    assert ((shrunk.weight - shared.weight) * (own.weight - shared.weight) >= 0).all()  # on the same side
    assert (np.abs(shrunk.weight - shared.weight) < np.abs(own.weight - shared.weight) + 1e-12).all()
    flat, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=1e12)
    np.testing.assert_allclose(flat.weight, shared.weight)
    with pytest.raises(ValueError, match="0 or more"):
        fit_fusion("power", coef, intercept, head, pooled, labels, shrink=-1.0)


def test_class_weights_survive_the_checkpoint_dict_and_read_as_a_range():
    head, pooled, labels, coef, intercept = _held_out()
    fusion, _ = fit_fusion("power", coef, intercept, head, pooled, labels, shrink=0.0)
    back = Fusion.from_dict(fusion.to_dict())
    np.testing.assert_array_equal(back.weight, fusion.weight)
    np.testing.assert_allclose(back.combine(head, back.decision(pooled)), fusion.combine(head, fusion.decision(pooled)))
    assert back.weight_text() == f"per class, {fusion.weight.min():g} to {fusion.weight.max():g}"
    assert Fusion(**{**fusion.__dict__, "weight": 0.25}).weight_text() == "0.25"


def test_shared_statistics_keep_fused_scores_comparable_across_classes():
    from patchnet.head.calibration import score_feature

    rng = np.random.default_rng(3)
    n, c, d = 40, 3, 8
    head = rng.random((n, c)) * np.array([1.0, 0.01, 0.1])  # classes on different scales, as a power mean gives
    pooled, coef, intercept = rng.random((n, d)), rng.normal(size=(c, d)), np.zeros(c)
    labels = np.where(np.eye(c, dtype=bool)[rng.integers(0, c, n)], 1, -1)
    fusion, _ = fit_fusion("power", coef, intercept, head, pooled, labels, weights=[0.0], shared=True)
    assert np.ptp(fusion.head_mean) == 0 and np.ptp(fusion.linear_std) == 0
    fused = fusion.combine(head, fusion.decision(pooled))
    assert (fused.argmax(1) == score_feature(head, "power").argmax(1)).all()  # weight 0: the head's own order
    own, _ = fit_fusion("power", coef, intercept, head, pooled, labels, weights=[0.0])
    assert np.ptp(own.head_mean) > 0
