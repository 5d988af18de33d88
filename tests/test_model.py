import pytest
import torch

from patchnet.head.layers import AdaptationHead, ByteDropout


def test_head_shapes_and_layers():
    head = AdaptationHead(1280, 20)
    assert head.fca[0].in_features == 1280 and head.fca[0].out_features == 2048
    assert isinstance(head.fca[1], torch.nn.ReLU) and head.fca[2].p == 0.5 and head.fca[2].keep == 128
    assert head.fcb.out_features == 21  # 20 classes + background
    assert head(torch.randn(7, 1280)).shape == (7, 21)


def test_dropout_only_in_training_and_probabilities_sum_to_one():
    torch.manual_seed(0)
    head = AdaptationHead(16, 3, hidden=64)
    x = torch.randn(5, 16)
    head.train()
    assert not torch.equal(head(x), head(x))  # dropout draws differ
    probs = head.probabilities(x)
    assert head.training  # restored
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-6)
    assert torch.equal(probs, head.probabilities(x.numpy()))  # no dropout when scoring
    half = head.probabilities(x.numpy().astype("float16"))  # the cache's dtype is accepted
    assert torch.allclose(probs, half, atol=1e-2)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_dropout_keeps_1_minus_p_of_the_units_and_the_expectation(p, dtype):
    torch.manual_seed(0)
    drop = ByteDropout(p)
    x = torch.ones(512, 1024, dtype=dtype, requires_grad=True)
    y = drop(x)
    kept = y != 0
    keep = round(256 * (1 - p)) / 256
    assert y.dtype == dtype and abs(kept.float().mean().item() - keep) < 0.005
    assert torch.all(y[kept] == 1 / keep)  # kept units rescaled exactly (powers of two up to bf16 rounding)
    assert abs(y.float().mean().item() - 1.0) < 0.01
    (g,) = torch.autograd.grad(y.float().sum(), x)
    assert torch.equal(g != 0, kept)  # gradients flow through the kept units only
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the generator state fixes the mask (resume draws the same masks)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_byte_dropout_near_one_keeps_one_byte_value_in_256():
    torch.manual_seed(0)
    y = ByteDropout(0.999)(torch.ones(256, 1024))
    assert torch.isfinite(y).all() and set(y.unique().tolist()) == {0.0, 256.0}
    assert abs((y != 0).float().mean().item() - 1 / 256) < 0.001


def test_byte_dropout_masks_are_independent_across_positions():
    torch.manual_seed(0)
    kept = (ByteDropout(0.5)(torch.ones(4096, 64)) != 0).float()
    assert kept.mean(0).sub(0.5).abs().max() < 0.05  # each column (each byte of a 64-bit draw) is fair
    a, b = kept[:, 0], kept[:, 1]  # neighbours, from the same 64-bit draw: uncorrelated
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_a_one_member_head_keeps_its_layers_and_gives_a_member_axis_on_request():
    head = AdaptationHead(16, 3, hidden=8)
    assert set(head.state_dict()) == {"fca.0.weight", "fca.0.bias", "fcb.weight", "fcb.bias"}
    x = torch.randn(5, 16)
    head.eval()
    assert torch.equal(head(x, members=True), head(x)[None])


def test_an_ensemble_head_scores_the_mean_softmax_of_its_members_each_an_ordinary_head():
    torch.manual_seed(0)
    ensemble = AdaptationHead(16, 3, hidden=8, dropout=0.0, members=3).eval()
    x = torch.randn(5, 16)
    alone, member_logits = [], ensemble(x, members=True)
    assert member_logits.shape == (3, 5, 4)
    for m in range(3):  # member m: the m-th block of FCa's units and its own FCb
        head = AdaptationHead(16, 3, hidden=8, dropout=0.0).eval()
        with torch.no_grad():
            head.fca[0].weight.copy_(ensemble.fca[0].weight[8 * m : 8 * (m + 1)])
            head.fca[0].bias.copy_(ensemble.fca[0].bias[8 * m : 8 * (m + 1)])
            head.fcb.weight.copy_(ensemble.fcb.weight[m].T)
            head.fcb.bias.copy_(ensemble.fcb.bias[m, 0])
        torch.testing.assert_close(member_logits[m], head(x))
        alone.append(head(x).softmax(-1))
    torch.testing.assert_close(ensemble.probabilities(x), torch.stack(alone).mean(0))
    # members start apart (one draw for all), as separately seeded heads would
    assert not torch.allclose(member_logits[0], member_logits[1])


def test_each_member_of_an_ensemble_head_gets_the_gradient_of_its_own_loss_alone():
    from patchnet.head.losses import sum_members

    torch.manual_seed(0)
    head = AdaptationHead(6, 2, hidden=4, dropout=0.0, members=2)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    z = head(x, members=True)
    sum_members(torch.nn.functional.cross_entropy(m, y) for m in z).backward()
    both = head.fcb.weight.grad.clone()
    head.zero_grad()
    torch.nn.functional.cross_entropy(head(x, members=True)[0], y).backward()
    torch.testing.assert_close(head.fcb.weight.grad[0], both[0])
    assert torch.count_nonzero(head.fcb.weight.grad[1]) == 0
    assert torch.count_nonzero(head.fca[0].weight.grad[4:]) == 0  # FCa's units of member 1 untouched
