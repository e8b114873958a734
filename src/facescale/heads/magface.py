"""MagFace (Meng et al., CVPR 2021): an angular margin that grows with the feature magnitude,
and a regulariser that rewards a larger magnitude for an easier sample."""

from __future__ import annotations

import torch
from torch import Tensor

from .margins import Margin, monotone_cos


class MagFace(Margin):
    """Target logit ``s * cos(theta + m(a))`` with ``a`` the feature norm clipped into
    ``[l_a, u_a]`` and ``m(a) = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)``; the loss adds
    ``lambda_g * g(a)``, ``g(a) = a / u_a**2 + 1 / a``, per sample. Both differentiate
    through ``a``; past pi the cosine continues monotonically as in :class:`CombinedMargin`.
    """

    uses_norms = True
    norm_grad = True

    def __init__(
        self,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
    ) -> None:
        super().__init__()
        if not (s > 0 and 0 < l_a < u_a and lambda_g >= 0):
            raise ValueError(
                f"MagFace(s={s}, l_a={l_a}, u_a={u_a}, lambda_g={lambda_g}): s > 0, "
                "0 < l_a < u_a and lambda_g >= 0"
            )
        self.s, self.l_a, self.u_a = float(s), float(l_a), float(u_a)
        self.l_m, self.u_m, self.lambda_g = float(l_m), float(u_m), float(lambda_g)

    def magnitude(self, norms: Tensor) -> Tensor:
        """The feature norms clipped into ``[l_a, u_a]``."""
        return norms.float().clamp(self.l_a, self.u_a)

    def margin_of(self, norms: Tensor) -> Tensor:
        """``m(a)``: the angular margin of each sample."""
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return self.l_m + slope * (self.magnitude(norms) - self.l_a)

    def target_logit(self, cosine: Tensor, norms: Tensor | None) -> Tensor:
        cosine = cosine.float()
        eps = torch.finfo(cosine.dtype).eps
        theta = torch.acos(cosine.clamp(-1 + eps, 1 - eps))
        return self.s * monotone_cos(theta + self.margin_of(norms))

    def regulariser(self, norms: Tensor) -> Tensor:
        a = self.magnitude(norms)
        return self.lambda_g * (a / self.u_a**2 + 1 / a)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
            f"lambda_g={self.lambda_g}"
        )
