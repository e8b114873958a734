"""The optimizer steps the host has not looked at yet: whether each was taken is decided on the
device, and the host reads the outcome only when it must (a report, an evaluation, a
checkpoint, the end), so the steps in between never wait for the device.

A step is skipped when its loss or its gradient norm is not finite. The host knows the step
count at its last look and how many steps were tried since, so the next step at which
anything happens (``horizon``) is reached no earlier than the tries say; it looks there, and
after a skipped step once per try until the count is exact again. The LR of each step comes
from a table of the steps up to the horizon, indexed on the device by the steps taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Outcome:
    """What the host learns when it looks."""

    step: int  # optimizer steps taken in all
    nonfinite_in_row: int  # non-finite losses since the last step taken
    nonfinite_since: int  # non-finite losses since the previous look
    loss: float  # of the last step tried
    grad_norm: float
    last_nonfinite_loss: float
    loss_scale: float


class PendingSteps:
    """Device-side counters of the steps tried since the host last looked."""

    def __init__(self, device: torch.device, lr_at: Callable[[int], float]) -> None:
        self.device, self.lr_at = device, lr_at
        self.step = 0  # taken, as of the last look
        self.tried = 0  # since the last look
        self.horizon = 0
        zero = torch.zeros((), device=device)
        self._taken = torch.zeros((), dtype=torch.int64, device=device)
        self._in_row, self._since = zero.clone(), zero.clone()
        self._loss, self._norm, self._bad_loss, self._scale = (zero.clone() for _ in range(4))
        self._lrs = zero[None]

    def start(self, step: int, nonfinite_in_row: int, horizon: int) -> None:
        """Count from ``step`` (exact); the host looks again once ``horizon`` may be reached."""
        self.step, self.tried, self.horizon = step, 0, max(horizon, step + 1)
        table = [self.lr_at(s) for s in range(step, self.horizon)]
        self._lrs = torch.tensor(table, dtype=torch.float32, device=self.device)
        self._taken.zero_()
        self._in_row.fill_(float(nonfinite_in_row))
        self._since.zero_()

    @property
    def due(self) -> bool:
        """Whether the step count may have reached the horizon (the host must look)."""
        return self.step + self.tried >= self.horizon

    def next_lr(self) -> Tensor:
        """The LR of the step about to be tried (a 0-d device tensor)."""
        return self._lrs.index_select(0, self._taken.view(1)).view(())

    def record(self, loss: Tensor, norm: Tensor, loss_scale: Tensor | float) -> Tensor:
        """Count one tried step; returns its skip flag (0-d float, 1: skip) for the optimizers."""
        finite_loss = torch.isfinite(loss)
        taken = finite_loss & torch.isfinite(norm)
        self._taken += taken
        # an fp16 overflow (finite loss) neither extends nor ends a run of non-finite losses
        self._in_row.copy_(torch.where(taken, 0.0, self._in_row + (~finite_loss).float()))
        self._since += (~finite_loss).float()
        self._loss.copy_(loss)
        self._norm.copy_(norm)
        self._bad_loss.copy_(torch.where(finite_loss, self._bad_loss, loss))
        if isinstance(loss_scale, Tensor):
            self._scale.copy_(loss_scale)
        else:
            self._scale.fill_(loss_scale)
        self.tried += 1
        return (~taken).float()

    def look(self) -> Outcome:
        """Read the counters on the host (the one synchronisation); :meth:`start` follows."""
        values = torch.stack(
            [
                self._taken.double(),
                self._in_row.double(),
                self._since.double(),
                self._loss.double(),
                self._norm.double(),
                self._bad_loss.double(),
                self._scale.double(),
            ]
        ).tolist()
        taken, in_row, since, loss, norm, bad_loss, scale = values
        step = self.step + int(taken)
        return Outcome(step, int(in_row), int(since), loss, norm, bad_loss, scale)
