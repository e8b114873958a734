"""Margins: what a margin-softmax head asks of its loss (:class:`Margin`), and the ArcFace
family's target logit ``s * (cos(m1 * theta + m2) - m3)``.

Only the target class of each sample gets the margin; every other class keeps ``s * cos``
unless the loss modulates negatives (CurricularFace). The gradient is the true derivative
of the target logit, unless ``straight_through`` asks for the no-grad margin of
arcface_torch (value with margin, gradient of ``s * cos``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def monotone_cos(psi: Tensor) -> Tensor:
    """``cos(psi)`` on [0, pi], continued so that it keeps decreasing outside that range.

    The continuation is the antiderivative of ``-|sin psi|`` through ``cos(0) = 1``: on
    ``[k*pi, (k+1)*pi]`` it is ``(-1)**k * cos(psi) - 2*k``. It is continuous with a
    continuous derivative, so a target angle that passes pi keeps lowering its logit.
    """
    k = torch.floor(psi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(psi) - 2.0 * k


class Margin(nn.Module):
    """A margin-softmax loss as the heads compute it: scale ``s``, each sample's target logit
    from its target cosine and feature norm, and optionally running state, modulated
    negatives and a per-sample regulariser. The base class is the plain margin of ``forward``.

    ``uses_norms``: it reads the feature norms; ``norm_grad``: its target logit or regulariser
    differentiates through them. ``running_state``: :meth:`observe` updates state kept in
    the head's ``state_dict``; ``observes_targets``: it needs the batch's target cosines.
    """

    s: float
    uses_norms = False
    norm_grad = False
    running_state = False
    observes_targets = False

    def target_logit(self, cosine: Tensor, norms: Tensor | None) -> Tensor:
        """Margin logits of target cosines, given the samples' feature norms (same shape)."""
        return self(cosine)

    def observe(self, norms: Tensor, target_cosine: Tensor | None) -> None:
        """Update running state from the global batch's detached feature norms and (when
        ``observes_targets``) target cosines; called by training forwards before any logit."""

    def negative_state(self) -> Tensor | None:
        """A copy of the state that modulates negative logits (None: they stay ``s * cos``)."""
        return None

    def modulate_(
        self, logits: Tensor, target: Tensor, state: Tensor, slope: Tensor, work: Tensor
    ) -> None:
        """Modulate the negative logits ``[rows, classes]`` in place (-inf: no class), given
        the rows' target logits and :meth:`negative_state`; write the derivative of the new
        logits to the old ones into ``slope``. ``work`` is a buffer of the same shape to use.
        No autograd."""
        raise NotImplementedError

    def regulariser(self, norms: Tensor) -> Tensor | None:
        """A per-sample term added to the loss (None: none)."""
        return None


class CombinedMargin(Margin):
    """Target logit ``s * (cos(m1 * theta + m2) - m3)`` with ``theta = acos(cos)``.

    ``cos`` is clamped into (-1, 1) so theta and its derivative stay finite; past
    ``m1 * theta + m2 = pi`` the cosine continues monotonically (:func:`monotone_cos`).
    ``straight_through=True`` keeps the value but back-propagates the gradient of
    ``s * cos``, as arcface_torch's no-grad margin does (only to reproduce old runs).
    """

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        *,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        values = {"s": s, "m1": m1, "m2": m2, "m3": m3}
        bad = [f"{k}={v!r}" for k, v in values.items() if not math.isfinite(v)]
        if bad or s <= 0 or m1 <= 0:
            raise ValueError(
                f"margin ({', '.join(f'{k}={v}' for k, v in values.items())}): "
                "s and m1 must be finite numbers > 0 and m2, m3 finite"
            )
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.straight_through = straight_through

    def forward(self, cosine: Tensor) -> Tensor:
        """Target logits for target cosines (any shape); reduced precision is computed in fp32."""
        if cosine.dtype in (torch.float16, torch.bfloat16):
            cosine = cosine.float()
        eps = torch.finfo(cosine.dtype).eps
        theta = torch.acos(cosine.clamp(-1.0 + eps, 1.0 - eps))
        logit = self.s * (monotone_cos(self.m1 * theta + self.m2) - self.m3)
        if not self.straight_through:
            return logit
        plain = self.s * cosine
        return plain + (logit - plain).detach()

    def extra_repr(self) -> str:
        flag = ", straight_through=True" if self.straight_through else ""
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}{flag}"


class ArcFace(CombinedMargin):
    """Additive angular margin: ``s * cos(theta + m)``."""

    def __init__(self, s: float = 64.0, m: float = 0.5, *, straight_through: bool = False) -> None:
        super().__init__(s, 1.0, m, 0.0, straight_through=straight_through)


class CosFace(CombinedMargin):
    """Additive cosine margin: ``s * (cos(theta) - m)``."""

    def __init__(self, s: float = 64.0, m: float = 0.4, *, straight_through: bool = False) -> None:
        super().__init__(s, 1.0, 0.0, m, straight_through=straight_through)
