"""Seconds per phase of the training loop, measured where the work runs.

On CPU a phase is the host's ``perf_counter`` between two marks. On a GPU the host only
queues kernels, so marks are CUDA events on the current stream; they are read when finished
(never waited for inside a step) or when the totals are asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

Mark = float | torch.cuda.Event
RESOLVE_AFTER = 256  # pending event pairs before the finished ones are read


class PhaseClock:
    """Accumulated seconds of named phases between marks; :meth:`totals` reads them."""

    def __init__(self, device: torch.device, phases: Iterable[str]) -> None:
        self.cuda = device.type == "cuda"
        self.phases = tuple(phases)
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.phases, 0.0)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def mark(self) -> Mark:
        """Now: on the host clock, or an event queued on the current CUDA stream."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, phase: str, start: Mark, end: Mark) -> None:
        """Count the time from ``start`` to ``end`` (two marks) towards ``phase``."""
        if not self.cuda:
            self.seconds[phase] += end - start
            return
        self._pending.append((phase, start, end))
        if len(self._pending) >= RESOLVE_AFTER:
            self._resolve(wait=False)

    def add_host_seconds(self, phase: str, seconds: float) -> None:
        """Count host-measured seconds (waiting for data) towards ``phase``."""
        self.seconds[phase] += seconds

    def _resolve(self, wait: bool) -> None:
        if wait and self._pending:
            self._pending[-1][2].synchronize()
        done = 0
        for phase, start, end in self._pending:
            if not (wait or end.query()):
                break
            self.seconds[phase] += start.elapsed_time(end) / 1000
            done += 1
        del self._pending[:done]

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (on a GPU, after the marked work has finished)."""
        self._resolve(wait=True)
        return dict(self.seconds)
