"""Partial FC: which classes of this rank's shard a step computes, and where the targets sit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from facescale.seeding import stream_seed


@dataclass
class ShardSelection:
    """The classes of this shard that one step computes, and the batch rows they are targets of.

    One target entry per global-batch row, so every shape is known on the host: the rows
    whose label is in this shard come first, sorted by column (rows in batch order within a
    column); the others are placeholders, with column ``count`` (past every computed
    column) and local id 0, that change nothing (:attr:`valid`, :meth:`masked`).
    """

    index: Tensor | None  # sorted local ids of the computed classes; None = the whole shard
    count: int  # number of computed classes
    target_rows: Tensor  # global-batch rows, this shard's targets first
    target_cols: Tensor  # their column among the computed classes (placeholders: >= count)
    target_local: Tensor  # their local class id (row of the shard; placeholders: 0)

    @property
    def valid(self) -> Tensor:
        """Per target entry: whether its row's label is in this shard (else a placeholder)."""
        return self.target_cols < self.count

    def masked(self, values: Tensor) -> Tensor:
        """``values`` (one per target entry along the first dimension) with the placeholders'
        entries exactly 0."""
        valid = self.valid.view(-1, *([1] * (values.dim() - 1)))
        return torch.where(valid, values, 0.0)

    def chunk_targets(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Per target: whether its column is in [lo, hi), and that column minus ``lo``
        clamped into the chunk; fixed shapes, so finding a chunk's targets never waits for
        the device (the caller masks the targets outside, placeholders among them)."""
        cols = self.target_cols - lo
        return (cols >= 0) & (cols < hi - lo), cols.clamp(0, hi - lo - 1)


class ClassSampler:
    """Every positive class plus uniform negatives, ``ceil(sample_rate * num_local)`` in all.

    Draw ``n`` uses a generator seeded from ``(seed, rank, n)``: ranks draw differently, and
    a run restored with :meth:`load_state_dict` draws exactly what it would have drawn.
    """

    def __init__(self, num_local: int, sample_rate: float, seed: int, rank: int) -> None:
        # Fraction(repr(rate)) is the decimal the user wrote, so 0.3 * 10 samples 3, not 4.
        self.num_sample = min(num_local, math.ceil(Fraction(repr(sample_rate)) * num_local))
        self.num_local, self.seed, self.rank = num_local, seed, rank
        self.draws = 0

    def draw(self, positives: Tensor) -> Tensor:
        """Sorted local ids to compute this step; ``positives`` are local ids that must be in
        it, where ``num_local`` stands for no class (a row outside the shard)."""
        generator = torch.Generator(device=positives.device)
        generator.manual_seed(stream_seed(self.seed, self.rank, self.draws))
        self.draws += 1
        # only when the batch could fill the sample (known from its size) is the distinct
        # count of the positives read (it waits for the device); below that, repeated
        # positives just mark their key twice
        if positives.numel() >= self.num_sample:
            positives = torch.unique(positives)
            positives = positives[positives < self.num_local]
            if positives.numel() >= self.num_sample:
                return positives
        # a spare last key takes the marks of rows outside the shard
        keys = torch.empty(self.num_local + 1, device=positives.device, dtype=torch.float32)
        torch.rand(self.num_local, generator=generator, out=keys[: self.num_local])
        # above every uniform key: positives are always kept (a scalar fill: no host copy)
        keys.index_fill_(0, positives, 2.0)
        return keys[: self.num_local].topk(self.num_sample, sorted=False).indices.sort().values

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])


def select_classes(
    labels: Tensor, start: int, num_local: int, sampler: ClassSampler | None
) -> ShardSelection:
    """Find this shard's targets in the global ``labels`` and (Partial FC) sample the classes.

    Every shape follows from the batch size (an empty shard has no target entries), so the
    host never waits for the device here (see :meth:`ClassSampler.draw` for the exception)."""
    if num_local == 0:
        labels = labels[:0]
    local = labels - start
    inside = (local >= 0) & (local < num_local)
    keyed = torch.where(inside, local, num_local)  # num_local: no class of this shard
    if sampler is None:
        index, count, cols = None, num_local, keyed
    else:
        index = sampler.draw(keyed)
        count, cols = index.numel(), torch.searchsorted(index, keyed)
    order = torch.argsort(cols, stable=True)  # this shard's targets first, by column
    return ShardSelection(index, count, order, cols[order], torch.where(inside, local, 0)[order])
