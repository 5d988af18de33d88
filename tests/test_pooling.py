import numpy as np
import pytest
import torch

from patchnet.head.pooling import gather_items, item_groups, patch_values, pool, pool_items
from patchnet.recipe import PoolConfig


def cfg(**kw):
    return PoolConfig(**kw)


def test_power_k_mean_by_hand():
    probs = torch.tensor([[0.5, 0.2], [0.1, 0.8], [1.0, 0.0]], dtype=torch.float64)
    got = pool(probs, [3], cfg(name="power", k=5))
    want = [(0.5**5 + 0.1**5 + 1.0) / 3, (0.2**5 + 0.8**5 + 0.0) / 3]
    np.testing.assert_allclose(got[0].numpy(), want)
    np.testing.assert_allclose(pool(probs, [3], cfg(name="power", k=1))[0].numpy(), [1.6 / 3, 1.0 / 3])


def test_larger_k_favours_a_few_confident_patches():
    one_sure = torch.tensor([[0.95]] + [[0.0]] * 9, dtype=torch.float64)
    many_unsure = torch.tensor([[0.3]] * 10, dtype=torch.float64)
    p1, p5 = cfg(name="power", k=1), cfg(name="power", k=5)
    assert pool(one_sure, [10], p1) < pool(many_unsure, [10], p1)
    assert pool(one_sure, [10], p5) > pool(many_unsure, [10], p5)


def test_max_and_lse_by_hand_on_two_images():
    e = torch.tensor([[1.0], [3.0], [-2.0], [0.5], [0.0]], dtype=torch.float64)  # images of 3 and 2 patches
    np.testing.assert_allclose(pool(e, [3, 2], cfg(name="max")).numpy().ravel(), [3.0, 0.5])
    r = 2.0
    want = [
        np.log(np.mean(np.exp(r * np.array([1.0, 3.0, -2.0])))) / r,
        np.log(np.mean(np.exp(r * np.array([0.5, 0.0])))) / r,
    ]
    np.testing.assert_allclose(pool(e, [3, 2], cfg(name="lse", r=r)).numpy().ravel(), want)
    # lse lies between the mean and the max, and tends to the max as r grows
    big = pool(e, [3, 2], cfg(name="lse", r=200.0)).numpy().ravel()
    np.testing.assert_allclose(big, [3.0, 0.5], atol=0.01)


def test_topk_plus_alpha_bottomk_by_hand():
    # 10 patches of one class: top 20% = 2 highest, bottom 30% = 3 lowest
    v = torch.tensor([5.0, -1.0, 2.0, 0.0, 9.0, -4.0, 1.0, 3.0, -2.0, 4.0], dtype=torch.float64)[:, None]
    got = pool(v, [10], cfg(name="topk", top=0.2, bottom=0.3, alpha=0.7)).item()
    assert got == pytest.approx((9 + 5) / 2 + 0.7 * (-4 - 2 - 1) / 3)
    # without the bottom term it is the mean of the top-k
    assert pool(v, [10], cfg(name="topk", top=0.2, bottom=0.0)).item() == pytest.approx(7.0)


def test_topk_with_images_of_different_sizes_matches_each_image_alone():
    rng = np.random.default_rng(0)
    counts = [7, 1, 12, 4]
    v = torch.from_numpy(rng.normal(size=(sum(counts), 3)))
    c = cfg(name="topk", top=0.3, bottom=0.25, alpha=0.5)
    together = pool(v, counts, c)
    start = 0
    for i, n in enumerate(counts):
        alone = pool(v[start : start + n], [n], c)
        np.testing.assert_allclose(together[i].numpy(), alone[0].numpy())
        x = np.sort(v[start : start + n].numpy(), axis=0)[::-1]
        top, bottom = max(1, round(0.3 * n)), max(1, round(0.25 * n))
        np.testing.assert_allclose(alone[0].numpy(), x[:top].mean(0) + 0.5 * x[n - bottom :].mean(0))
        start += n


@pytest.mark.parametrize("name", ["max", "lse", "topk", "power"])
def test_pooling_is_differentiable(name):
    v = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    pool(v, [4, 5], cfg(name=name)).sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_bad_counts_and_names_are_refused():
    v = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="add up"):
        pool(v, [3], cfg(name="max"))
    with pytest.raises(ValueError, match="at least one patch"):
        pool(v, [4, 0], cfg(name="max"))
    with pytest.raises(ValueError, match="power, max, lse, topk"):
        pool(v, [4], cfg(name="median"))


def test_patch_values_power_is_softmax_and_evidence_is_logit_against_background():
    logits = torch.tensor([[2.0, 0.0, 1.0]])  # two classes + background
    np.testing.assert_allclose(patch_values(logits, "power").numpy(), logits.softmax(-1)[:, :2].numpy())
    np.testing.assert_allclose(patch_values(logits, "max").numpy(), [[1.0, -1.0]])


def test_item_groups_cover_every_item_once_within_the_budget():
    counts = np.array([3, 0, 5, 2, 9, 1])
    groups = list(item_groups(counts, 6))
    assert [i for a, b in groups for i in range(a, b)] == list(range(6))
    for a, b in groups:
        assert counts[a:b].sum() <= 6 or b == a + 1


class Linear:
    """A stand-in head: logits are the features themselves."""

    num_classes = 2

    def logits(self, x):
        return torch.as_tensor(np.asarray(x, np.float32))


def test_pool_items_streams_groups_and_marks_empty_items_nan():
    rng = np.random.default_rng(1)
    counts = np.array([4, 0, 3, 5])
    offsets = np.r_[0, np.cumsum(counts)]
    feats = rng.normal(size=(offsets[-1], 3)).astype(np.float16)
    c = cfg(name="topk", top=0.5, bottom=0.5, alpha=0.7)
    got = pool_items(Linear(), feats, offsets, c, max_patches=4)
    assert np.isnan(got[1]).all()
    for i in (0, 2, 3):
        x = torch.from_numpy(feats[offsets[i] : offsets[i + 1]].astype(np.float32))
        np.testing.assert_allclose(got[i], pool(patch_values(x, "topk").double(), [counts[i]], c)[0].numpy(), rtol=1e-6)
    sub = pool_items(Linear(), feats, offsets, c, items=np.array([3, 0]))
    np.testing.assert_allclose(sub, got[[3, 0]])
    np.testing.assert_array_equal(gather_items(feats, offsets, np.array([2])), feats[4:7].astype(np.float32))


def test_pooled_share_keeps_about_the_share_of_every_image_and_never_none():
    from patchnet.head.pooling import pooled_share

    rng = np.random.default_rng(0)
    counts = np.array([1, 3, 400, 1000, 2])
    draw = rng.random(counts.sum())
    mask = pooled_share(draw, counts, 0.1)
    per_image = np.add.reduceat(mask, np.cumsum(counts) - counts)
    assert (per_image >= 1).all()
    assert 0.07 < per_image[3] / 1000 < 0.13 and 0.06 < per_image[2] / 400 < 0.14
    # exactly the rows under the share, plus each image's lowest draw
    starts = np.cumsum(counts) - counts
    lowest = np.zeros_like(mask)
    lowest[[s + np.argmin(draw[s : s + n]) for s, n in zip(starts, counts)]] = True
    np.testing.assert_array_equal(mask, (draw < 0.1) | lowest)
    assert pooled_share(draw, counts, 1.0).all()
