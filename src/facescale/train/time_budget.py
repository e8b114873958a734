"""The wall-clock time a run trains for, counted across resumes, and its budget.

Every rank reads the same elapsed time (the slowest rank's clock, all-reduced at each
optimizer step), so under a budget all ranks take the same LR and stop at the same step.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class TrainingTime:
    """Seconds of training so far: ``spent`` before this session, plus this session's."""

    def __init__(self, budget_s: float, spent: float, device: torch.device) -> None:
        """``budget_s`` 0 means no budget: the clock is then read on each rank alone."""
        self.budget_s, self.device = budget_s, device
        self._spent, self._started = spent, time.perf_counter()

    @property
    def limited(self) -> bool:
        return self.budget_s > 0

    def elapsed(self) -> float:
        """Training seconds so far; under a budget the same on every rank (a collective call)."""
        seconds = self._spent + time.perf_counter() - self._started
        if not (self.limited and dist.is_initialized()):
            return seconds
        agreed = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return float(agreed.item())

    def share(self, elapsed: float) -> float:
        """The share of the budget that ``elapsed`` seconds use (1.0 when it is spent)."""
        return min(1.0, elapsed / self.budget_s)

    def spent(self, elapsed: float) -> bool:
        return self.limited and elapsed >= self.budget_s
