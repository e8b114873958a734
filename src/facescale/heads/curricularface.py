"""CurricularFace (Huang et al., CVPR 2020): hard negatives are weighted up as training
proceeds, by a parameter ``t`` that follows the global batch's mean target cosine."""

from __future__ import annotations

import torch
from torch import Tensor

from .margins import CombinedMargin


class CurricularFace(CombinedMargin):
    """ArcFace's target logit ``s * cos(theta + m)``; a negative whose cosine ``c`` exceeds
    the target's margin cosine ``cos(theta + m)`` becomes ``s * c * (t + c)``.

    ``t`` (from 0) is updated on each training batch, before the negatives use it, to
    ``(1 - momentum) * t + momentum * mean(target cosine)`` over the global batch; it has no
    gradient, nor has the choice of which negatives are hard.
    """

    observes_targets = True
    running_state = True

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.01) -> None:
        super().__init__(s, 1.0, m, 0.0)
        if not 0 <= momentum <= 1:
            raise ValueError(f"CurricularFace(momentum={momentum}): momentum in [0, 1]")
        self.momentum = momentum
        self.register_buffer("t", torch.tensor(0.0))

    def observe(self, norms: Tensor, target_cosine: Tensor | None) -> None:
        mean = target_cosine.detach().float().mean()
        self.t.mul_(1 - self.momentum).add_(self.momentum * mean)

    def negative_state(self) -> Tensor:
        return self.t.detach().clone()

    def modulate_(
        self, logits: Tensor, target: Tensor, state: Tensor, slope: Tensor, work: Tensor
    ) -> None:
        # elementwise arithmetic with a 0/1 float mask: no boolean indexing or where, which
        # are several times slower per element on CPU
        hard = torch.gt(logits, target[:, None], out=work)  # -inf (targets, filtered) is not
        torch.clamp(logits, min=-self.s, out=slope)  # finite: -inf times 0 would be NaN
        torch.add(state - 1, slope, alpha=1 / self.s, out=slope)  # t + c - 1
        torch.addcmul(slope.new_ones(()), slope, hard, out=slope)  # f: t + c where hard, else 1
        logits.mul_(slope)  # s * c * (t + c) where hard
        torch.add(slope.new_tensor(-1.0), slope, alpha=2, out=slope)  # 2f - 1
        slope.addcmul_(hard, 1 - state)  # d(s c (t + c)) / d(s c) = t + 2c where hard, else 1

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m2}, momentum={self.momentum}"
