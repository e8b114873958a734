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

    def modulate(self, logits: Tensor, target: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        hard = logits > target[:, None]  # -inf (targets, filtered classes) is never hard
        hard_logits = torch.where(hard, logits, torch.zeros_like(logits))
        cosine = hard_logits / self.s
        modulated = torch.where(hard, hard_logits * (state + cosine), logits)
        slope = torch.where(hard, state + 2 * cosine, torch.ones_like(logits))
        return modulated, slope

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m2}, momentum={self.momentum}"
