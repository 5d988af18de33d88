import pytest
import torch

from patchnet.model import (
    AdaptationHead,
    ByteDropout,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)


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


def test_checkpoints_are_written_atomically_and_loaded_safely(tmp_path):
    path = tmp_path / "run" / "last.pt"
    state = {"head": {"w": torch.ones(2)}, "recipe": {"backbone": {"name": "x"}}, "classes": ["a"], "feature_dim": 4}
    save_checkpoint(state, path)
    assert not (tmp_path / "run" / "last.pt.tmp").exists()
    assert torch.equal(load_checkpoint(path)["head"]["w"], torch.ones(2))


def test_unsafe_or_foreign_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"head": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: not a readable patchnet checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a patchnet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_checkpoint_from_another_backbone_or_class_list_is_refused():
    state = {"recipe": {"backbone": {"name": "efficientnet_lite0"}}, "classes": ["cat", "dog"], "feature_dim": 1280}
    check_compatible(state, "x.pt", "efficientnet_lite0", ["cat", "dog"], 1280)
    with pytest.raises(CheckpointError, match="trained on backbone efficientnet_lite0 .* uses resnet50"):
        check_compatible(state, "x.pt", "resnet50", ["cat", "dog"], 2048)
    with pytest.raises(CheckpointError, match=r"trained for classes \['cat', 'dog'\]"):
        check_compatible(state, "x.pt", "efficientnet_lite0", ["cat", "cow"], 1280)
