"""The adaptation layers trained on top of the frozen trunk (their checkpoints: ``patchnet.checkpoint``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class ByteDropout(nn.Module):
    """Dropout drawn from random bytes: a unit is kept when its byte is below ``round(256 (1 - p))``.

    ``p`` moves in steps of 1/256 (0.5 is exact) and kept units are scaled by 256 / that count, so the
    expectation is unchanged. Same masks from the same generator state, like ``nn.Dropout``, but the
    bytes come eight to a 64-bit draw: on a CPU the head's training step is about a third faster than
    with ``bernoulli_``, which took 40% of it.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p
        self.keep = max(1, round(256 * (1.0 - p)))  # at least one byte value keeps a unit

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep == 256:
            return x
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        byte = words.view(torch.uint8)[:n].view(x.shape).to(x.dtype)  # integers 0..255: exact in bf16 and fp16
        mask = (self.keep - byte).clamp_(0, 1).mul_(256 / self.keep)  # 1 below keep, else 0; then rescaled
        return x * mask


class MemberLinear(nn.Module):
    """``members`` independent ``nn.Linear(in_features, out_features)`` layers, member m reading the m-th
    block of ``in_features`` inputs: (N, members * in) -> (members, N, out)."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's initial range, per member
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features).uniform_(-bound, bound))

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.members, self.in_features).transpose(0, 1)
        return torch.baddbmm(self.bias, x, self.weight)


def mean_softmax_logits(z: torch.Tensor) -> torch.Tensor:
    """(members, N, K) logits -> (N, K) logits whose softmax is the members' mean softmax."""
    if len(z) == 1:
        return z[0]
    return torch.logsumexp(z.float().log_softmax(-1), 0) - math.log(len(z))


class AdaptationHead(nn.Module):
    """FCa = Linear(d, hidden) + ReLU + Dropout, then FCb = Linear(hidden, C + 1).

    The last output is the background class; softmax runs over all C + 1 outputs. With ``members`` > 1
    the head is an ensemble of that many such heads, each trained by its own loss, run as one wider FCa;
    its output is the log of the members' mean softmax, so its softmax is their average.
    """

    def __init__(self, feature_dim: int, num_classes: int, hidden: int = 2048, dropout: float = 0.5, members: int = 1):
        super().__init__()
        self.num_classes, self.members = num_classes, members
        self.fca = nn.Sequential(nn.Linear(feature_dim, members * hidden), nn.ReLU(inplace=True), ByteDropout(dropout))
        out = num_classes + 1
        self.fcb = nn.Linear(hidden, out) if members == 1 else MemberLinear(members, hidden, out)

    def forward(self, features: torch.Tensor, members: bool = False) -> torch.Tensor:
        """(N, d) features -> (N, C + 1) logits; with ``members``, each member's: (members, N, C + 1)."""
        z = self.fcb(self.fca(features))
        z = z[None] if self.members == 1 else z  # (members, N, C + 1)
        return z if members else mean_softmax_logits(z)

    @torch.no_grad()
    def logits(self, features, batch_size: int = 16384) -> torch.Tensor:
        """(N, C + 1) logits in inference mode, on the CPU; ``features`` may be a memory-mapped fp16 array."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        was_training = self.training
        self.eval()
        weight = self.fcb.weight  # the head's device
        out = [
            self(torch.from_numpy(np.array(features[i : i + batch_size], dtype=np.float32)).to(weight.device))
            .float()
            .cpu()
            for i in range(0, len(features), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes + 1)

    def probabilities(self, features, batch_size: int = 16384) -> torch.Tensor:
        """(N, C + 1) softmax outputs in inference mode."""
        return self.logits(features, batch_size).softmax(-1)
