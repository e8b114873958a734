"""The margin softmax cross-entropy over classes split across ranks, in fp32 statistics.

A shard reports, per row, the maximum ``m`` of its non-target logits and ``sumexp``, the
sum of ``exp(logit - m)`` (0 when it has none); :func:`log_sum_exp` joins those of all
ranks with the target logit. Targets and filtered negatives are -inf in a shard's logits:
the target enters once, through its margin logit; filtered negatives leave the softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .collectives import max_across_ranks, sum_across_ranks, summed
from .margins import Margin


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with -inf entries (rows without any logit) replaced by 0, to shift by safely."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def drop_filtered_(logits: Tensor, limit: float) -> Tensor:
    """With ``limit > 0`` (``s * interclass_filtering_threshold``) logits above it become -inf."""
    if limit > 0:
        logits.masked_fill_(logits > limit, float("-inf"))
    return logits


def row_sumexp(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row maximum (-inf for a row of -inf) and sum of ``exp(logit - max)``."""
    if logits.shape[1] == 0:
        top = logits.new_full((logits.shape[0],), float("-inf"))
    else:
        top = logits.detach().amax(dim=1)
    return top, torch.exp(logits - finite_or_zero(top)[:, None]).sum(dim=1)


def target_cosine(embeddings: Tensor, centers: Tensor) -> Tensor:
    """Row-wise cosine of matching rows, in fp32 whatever the logits dtype."""
    return (embeddings.float() * centers.float()).sum(dim=1)


def log_sum_exp(top: Tensor, sumexp: Tensor, target_logit: Tensor, across_ranks: bool) -> Tensor:
    """``log(sum exp(logits))`` per row over every shard's negatives and the target logit."""
    shift = max_across_ranks(top) if across_ranks else top.detach()
    shift = torch.maximum(shift, target_logit.detach())
    negatives = sumexp * torch.exp(top.detach() - shift)  # exp(-inf) = 0 for empty shards
    if across_ranks:
        negatives = sum_across_ranks(negatives)
    return shift + torch.log(negatives + torch.exp(target_logit - shift))


def inverse_norms(weight: Tensor) -> Tensor:
    """``1 / ||row||`` per row, the norm clamped at 1e-12 as :func:`F.normalize` does."""
    return torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12).reciprocal()


def observe_batch(
    margin: Margin, norms: Tensor | None, cosine: Tensor, rows: Tensor, batch: int, training: bool
) -> None:
    """On a ``training`` forward (of a margin in training mode), let ``margin`` update its
    running state from the global batch: the gathered ``norms`` and, when it asks, every
    row's target cosine (``cosine`` holds this shard's targets, of rows ``rows``; the other
    ranks hold the rest)."""
    if not (training and margin.training and margin.running_state):
        return
    target_cosine = None
    if margin.observes_targets:
        local = cosine.new_zeros(batch).index_add_(0, rows, cosine.detach().float())
        target_cosine = summed(local)
    margin.observe(norms, target_cosine)


def modulated(logits: Tensor, margin: Margin, target: Tensor, state: Tensor) -> Tensor:
    """``logits`` after the margin's modulation of negatives, with its derivative as the
    gradient (the value from :meth:`Margin.modulate_`, applied to a copy)."""
    value, slope = logits.detach().clone(), torch.empty_like(logits)
    margin.modulate_(value, target, state, slope, torch.empty_like(logits))
    change = torch.where(torch.isfinite(value), (logits - logits.detach()) * slope, 0.0)
    return value + change


def dense_shard_terms(
    embeddings: Tensor,
    norms: Tensor | None,
    weight: Tensor,
    target_rows: Tensor,
    target_cols: Tensor,
    margin: Margin,
    threshold: float,
    dtype: torch.dtype,
    across_ranks: bool,
    subcenters: int = 1,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(top, sumexp, target_logits)`` of one shard, in full with autograd.

    ``embeddings`` are L2-normalised (``norms``: their feature norms, for the losses that
    read them); ``weight`` holds raw centers, whose inverse norms scale the logits' columns.
    With ``subcenters = k``, rows ``c * k ... c * k + k - 1`` of ``weight`` are class column
    ``c``'s sub-centers and its logit is their largest. The target of row ``target_rows[i]``
    is column ``target_cols[i]``, a real one where ``valid[i]`` (default: everywhere), else
    a placeholder that changes nothing; ``target_logits`` holds every row's margin logit,
    summed over the ranks ``across_ranks``.
    """
    scaled = (embeddings * margin.s).to(dtype)
    logits = torch.mm(scaled, weight.to(dtype).t()).float() * inverse_norms(weight)
    if subcenters > 1:
        classes = weight.shape[0] // subcenters
        logits = logits.view(logits.shape[0], classes, subcenters).amax(dim=2)

    def real(values: Tensor) -> Tensor:
        return values if valid is None else torch.where(valid, values, 0.0)

    cosine = logits[target_rows, target_cols] / margin.s
    if across_ranks:
        training = torch.is_grad_enabled()
        observe_batch(margin, norms, real(cosine), target_rows, embeddings.shape[0], training)
    row_norms = None if norms is None else norms[target_rows]
    local = real(margin.target_logit(cosine, row_norms))
    target = embeddings.new_zeros(embeddings.shape[0]).index_add(0, target_rows, local)
    if across_ranks:
        target = sum_across_ranks(target)
    drop_filtered_(logits, margin.s * threshold)
    at = (target_rows, target_cols)
    if valid is None:
        logits = logits.index_put(at, logits.new_tensor(float("-inf")))
    else:  # only the real targets' positions
        hit = torch.zeros_like(logits, dtype=torch.bool).index_put_(at, valid)
        logits = logits.masked_fill(hit, float("-inf"))
    state = margin.negative_state()
    if state is not None:
        logits = modulated(logits, margin, target.detach(), state)
    top, sumexp = row_sumexp(logits)
    return top, sumexp, target
