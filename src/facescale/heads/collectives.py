"""Collectives the head needs, with the gradients its loss needs; no-ops on a single rank.

Every rank computes the same global loss, so a value summed across ranks passes its
gradient through unchanged (:func:`sum_across_ranks`), while gathered embeddings send the
sum of all ranks' gradients back to the rows each rank contributed (:func:`gather_rows`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from facescale.distributed import get_rank, get_world_size


def gather_counts(values: list[int], device: torch.device) -> Tensor:
    """A ``[world, len(values)]`` int64 table of every rank's ``values``."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    if get_world_size() == 1:
        return mine[None]
    table = [torch.empty_like(mine) for _ in range(get_world_size())]
    dist.all_gather(table, mine)
    return torch.stack(table)


def _all_gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``x`` (first dims ``sizes``) on every rank; pads for gloo."""
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        rank = get_rank()
        ctx.rows = (sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        start, stop = ctx.rows
        return summed(grad.contiguous())[start:stop], None


def gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """All ranks' rows of ``x`` in rank order; the gradient of each row returns to its rank."""
    if get_world_size() == 1:
        return x
    if not x.requires_grad:
        return _all_gather_padded(x, sizes)
    return _GatherRows.apply(x, sizes)


def summed(x: Tensor) -> Tensor:
    """Elementwise sum of ``x`` over ranks in a new tensor (``x`` itself on one rank)."""
    if get_world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total


class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return summed(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def sum_across_ranks(x: Tensor) -> Tensor:
    """Elementwise sum over ranks; the gradient passes through, since every rank holds the sum."""
    if get_world_size() == 1:
        return x
    return _SumAcrossRanks.apply(x)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` itself, whose gradient is multiplied by ``factor`` on its way back."""
    if factor == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, factor)


def max_across_ranks(x: Tensor) -> Tensor:
    """Elementwise maximum over ranks (no gradient: the head uses it only as a shift)."""
    if get_world_size() == 1:
        return x.detach()
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total
