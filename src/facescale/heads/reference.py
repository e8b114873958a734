"""The slow, obviously correct loss the heads are tested against: float64, one process.

The full ``[batch x classes]`` cosine matrix, the margin written out piece by piece, and
``torch.nn.functional.cross_entropy``; gradients come from plain autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .margins import CombinedMargin


def reference_target_logit(cosine: Tensor, margin: CombinedMargin) -> Tensor:
    """``s * (cos(psi) - m3)`` with ``psi = m1 * theta + m2``.

    Past pi the cosine continues as ``-2 - cos(psi)``, below 0 as ``2 - cos(psi)``.
    """
    eps = torch.finfo(cosine.dtype).eps
    psi = margin.m1 * torch.acos(cosine.clamp(-1 + eps, 1 - eps)) + margin.m2
    if bool((psi <= -math.pi).any() or (psi >= 2 * math.pi).any()):
        raise ValueError("the reference margin covers m1 * theta + m2 in (-pi, 2 pi) only")
    value = torch.where(
        psi > math.pi, -2 - torch.cos(psi), torch.where(psi < 0, 2 - torch.cos(psi), torch.cos(psi))
    )
    logit = margin.s * (value - margin.m3)
    if margin.straight_through:
        return margin.s * cosine + (logit - margin.s * cosine).detach()
    return logit


def reference_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    margin: CombinedMargin,
    *,
    threshold: float = 0.0,
    classes: Tensor | None = None,
) -> Tensor:
    """Mean margin-softmax cross-entropy of ``embeddings`` against all rows of ``weight``.

    ``classes`` (sorted global ids containing every label) restricts the softmax to those
    classes, as Partial FC's sampling does; ``threshold > 0`` drops negatives whose cosine
    exceeds it from the softmax.
    """
    x = F.normalize(embeddings.double(), dim=1)
    w = F.normalize(weight.double(), dim=1)
    if classes is not None:
        w, labels = w[classes], torch.searchsorted(classes, labels)
    cosine = x @ w.t()
    rows = torch.arange(len(labels))
    target = reference_target_logit(cosine[rows, labels], margin)
    logits = (margin.s * cosine).index_put((rows, labels), target)
    if threshold > 0:
        dirty = cosine.detach() > threshold
        dirty[rows, labels] = False
        logits = logits.masked_fill(dirty, float("-inf"))
    return F.cross_entropy(logits, labels)
