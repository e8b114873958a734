"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality, read from the
feature norm normalised by running statistics of the global batch's norms."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .margins import Margin


class AdaFace(Margin):
    """Target logit ``s * (cos(clip(theta - m * z, eps, pi - eps)) - m - m * z)``.

    ``z = clip(h * (n - mean) / (std + eps), -1, 1)`` with ``n`` the feature norm clipped into
    [0.001, 100] and detached, ``mean`` and ``std`` the running statistics of the norms,
    updated with momentum ``t_alpha`` from each training batch (global batch, unbiased std)
    before use; ``theta = acos(cos)``, the cosine clipped into [-1 + eps, 1 - eps].
    """

    uses_norms = True
    running_state = True

    def __init__(
        self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01
    ) -> None:
        super().__init__()
        if not (s > 0 and math.isfinite(m) and h >= 0 and 0 <= t_alpha <= 1):
            raise ValueError(
                f"AdaFace(s={s}, m={m}, h={h}, t_alpha={t_alpha}): s > 0, m finite, h >= 0 "
                "and t_alpha in [0, 1]"
            )
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), t_alpha, 1e-3
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def observe(self, norms: Tensor, target_cosine: Tensor | None) -> None:
        safe = norms.detach().float().clamp(0.001, 100)
        std = safe.std() if safe.numel() > 1 else safe.new_zeros(())
        a = self.t_alpha
        self.batch_mean.mul_(1 - a).add_(a * safe.mean())
        self.batch_std.mul_(1 - a).add_(a * std)

    def target_logit(self, cosine: Tensor, norms: Tensor | None) -> Tensor:
        cosine = cosine.float()
        safe = norms.detach().float().clamp(0.001, 100)
        z = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)
        theta = torch.acos(cosine.clamp(-1 + self.eps, 1 - self.eps))
        angle = (theta - self.m * z).clamp(self.eps, math.pi - self.eps)
        return self.s * (torch.cos(angle) - self.m - self.m * z)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
