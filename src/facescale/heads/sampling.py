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

    Target arrays are sorted by column (rows in batch order within a column); a batch row is
    the target of at most one column.
    """

    index: Tensor | None  # sorted local ids of the computed classes; None = the whole shard
    count: int  # number of computed classes
    target_rows: Tensor  # global-batch rows whose label is in this shard
    target_cols: Tensor  # their column among the computed classes
    target_local: Tensor  # their local class id (row of the shard)

    def chunk_targets(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Per target: whether its column is in [lo, hi), and that column minus ``lo``
        clamped into the chunk; fixed shapes, so finding a chunk's targets never waits for
        the device (the caller masks the targets outside)."""
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
        """Sorted local ids to compute this step; ``positives`` are local ids that must be in it."""
        generator = torch.Generator(device=positives.device)
        generator.manual_seed(stream_seed(self.seed, self.rank, self.draws))
        self.draws += 1
        # only when the targets could fill the sample is their distinct count read (it waits
        # for the device); below that, repeated positives just mark their key twice
        if positives.numel() >= self.num_sample:
            positives = torch.unique(positives)
            if positives.numel() >= self.num_sample:
                return positives
        keys = torch.rand(
            self.num_local, generator=generator, device=positives.device, dtype=torch.float32
        )
        keys[positives] = 2.0  # above every uniform key: positives are always kept
        return keys.topk(self.num_sample, sorted=False).indices.sort().values

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])


def select_classes(
    labels: Tensor, start: int, num_local: int, sampler: ClassSampler | None
) -> ShardSelection:
    """Find this shard's targets in the global ``labels`` and (Partial FC) sample the classes."""
    rows = ((labels >= start) & (labels < start + num_local)).nonzero().squeeze(1)
    local = labels[rows] - start
    if sampler is None:
        index, count, cols = None, num_local, local
    else:
        index = sampler.draw(local)
        count, cols = index.numel(), torch.searchsorted(index, local)
    order = torch.argsort(cols, stable=True)
    return ShardSelection(index, count, rows[order], cols[order], local[order])
