"""The slow, obviously correct loss the heads are tested against: float64, one process.

The full ``[batch x classes]`` cosine matrix, each loss's formula written out piece by piece
from its paper, and ``torch.nn.functional.cross_entropy``; gradients come from plain
autograd. Running state (AdaFace's norm statistics, CurricularFace's ``t``) is read from the
margin as it stands before the batch and is not changed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .adaface import AdaFace
from .curricularface import CurricularFace
from .magface import MagFace
from .margins import CombinedMargin, Margin


def continued_cos(psi: Tensor) -> Tensor:
    """``cos(psi)``, continued past pi as ``-2 - cos(psi)`` and below 0 as ``2 - cos(psi)``."""
    if bool((psi <= -math.pi).any() or (psi >= 2 * math.pi).any()):
        raise ValueError("the reference margin covers m1 * theta + m2 in (-pi, 2 pi) only")
    return torch.where(
        psi > math.pi, -2 - torch.cos(psi), torch.where(psi < 0, 2 - torch.cos(psi), torch.cos(psi))
    )


def reference_target_logit(cosine: Tensor, margin: CombinedMargin) -> Tensor:
    """``s * (cos(psi) - m3)`` with ``psi = m1 * theta + m2`` (:func:`continued_cos`)."""
    eps = torch.finfo(cosine.dtype).eps
    psi = margin.m1 * torch.acos(cosine.clamp(-1 + eps, 1 - eps)) + margin.m2
    logit = margin.s * (continued_cos(psi) - margin.m3)
    if margin.straight_through:
        return margin.s * cosine + (logit - margin.s * cosine).detach()
    return logit


def adaface_statistics(margin: AdaFace, norms: Tensor) -> tuple[Tensor, Tensor]:
    """The norms' running mean and standard deviation after one batch of ``norms``."""
    safe = norms.detach().clamp(0.001, 100)
    a = margin.t_alpha
    mean = (1 - a) * margin.batch_mean.double() + a * safe.mean()
    return mean, (1 - a) * margin.batch_std.double() + a * safe.std()


def adaface_target_logit(cosine: Tensor, norms: Tensor, margin: AdaFace) -> Tensor:
    """AdaFace's eq.: ``s * (cos(theta + g_angle) - g_add)``, ``g_angle = -m * z`` and
    ``g_add = m * z + m``, ``z`` the clipped, normalised feature norm (no gradient)."""
    mean, std = adaface_statistics(margin, norms)
    safe = norms.detach().clamp(0.001, 100)
    z = torch.clip(margin.h * (safe - mean) / (std + margin.eps), -1, 1)
    theta = torch.acos(cosine.clamp(-1 + margin.eps, 1 - margin.eps))
    angle = torch.clip(theta - margin.m * z, margin.eps, math.pi - margin.eps)
    return margin.s * (torch.cos(angle) - (margin.m * z + margin.m))


def magface_target_logit(cosine: Tensor, norms: Tensor, margin: MagFace) -> Tensor:
    """MagFace's ``s * cos(theta + m(a))``, ``m(a)`` linear from ``l_m`` at ``a = l_a`` to
    ``u_m`` at ``a = u_a``, ``a`` the feature norm clipped into ``[l_a, u_a]``."""
    a = norms.clamp(margin.l_a, margin.u_a)
    m = margin.l_m + (margin.u_m - margin.l_m) * (a - margin.l_a) / (margin.u_a - margin.l_a)
    eps = torch.finfo(cosine.dtype).eps
    return margin.s * continued_cos(torch.acos(cosine.clamp(-1 + eps, 1 - eps)) + m)


def magface_regulariser(norms: Tensor, margin: MagFace) -> Tensor:
    """``lambda_g * (a / u_a**2 + 1 / a)`` per sample."""
    a = norms.clamp(margin.l_a, margin.u_a)
    return margin.lambda_g * (a / margin.u_a**2 + 1 / a)


def curricular_t(margin: CurricularFace, target_cosine: Tensor) -> Tensor:
    """CurricularFace's ``t`` after one batch: ``(1 - momentum) t + momentum * mean cos``."""
    mean = target_cosine.detach().mean()
    return (1 - margin.momentum) * margin.t.double() + margin.momentum * mean


def reference_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    margin: Margin,
    *,
    threshold: float = 0.0,
    classes: Tensor | None = None,
    subcenters: int = 1,
) -> Tensor:
    """Mean margin-softmax cross-entropy of ``embeddings`` against all rows of ``weight``.

    ``classes`` (sorted global ids containing every label) restricts the softmax to those
    classes, as Partial FC's sampling does; ``threshold > 0`` drops negatives whose cosine
    exceeds it from the softmax. With ``subcenters = k``, rows ``c * k ... c * k + k - 1`` of
    ``weight`` are class ``c``'s centers and its cosine is the largest of theirs.
    """
    norms = torch.linalg.vector_norm(embeddings.double(), dim=1)
    x = F.normalize(embeddings.double(), dim=1)
    w = F.normalize(weight.double(), dim=1).view(-1, subcenters, weight.shape[1])
    if classes is not None:
        w, labels = w[classes], torch.searchsorted(classes, labels)
    cosine = (x @ w.flatten(0, 1).t()).view(len(x), len(w), subcenters).amax(dim=2)
    rows = torch.arange(len(labels))
    target_cosine = cosine[rows, labels]
    logits = margin.s * cosine
    if isinstance(margin, AdaFace):
        target = adaface_target_logit(target_cosine, norms, margin)
    elif isinstance(margin, MagFace):
        target = magface_target_logit(target_cosine, norms, margin)
    else:
        target = reference_target_logit(target_cosine, margin)
    if isinstance(margin, CurricularFace):
        t = curricular_t(margin, target_cosine)
        hard = cosine.detach() > (target.detach() / margin.s)[:, None]
        logits = torch.where(hard, margin.s * cosine * (t + cosine), logits)
    logits = logits.index_put((rows, labels), target)
    if threshold > 0:
        dirty = cosine.detach() > threshold
        dirty[rows, labels] = False
        logits = logits.masked_fill(dirty, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    if isinstance(margin, MagFace):
        loss = loss + magface_regulariser(norms, margin).mean()
    return loss
