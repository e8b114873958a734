"""Shared-memory batch buffers that worker processes reuse instead of allocating per batch.

Handing a freshly allocated tensor from a worker to the main process costs a new shared
memory segment and its page faults on both sides, about as much CPU as decoding a third of
the batch. Each worker instead fills one of a few buffers it shares once; the main process
copies a batch out (normalising it, or pinning it for the GPU) and then publishes how far it
got, and a worker writes a buffer again only after the batch it last held was copied out.
"""

from __future__ import annotations

import os
import time

import torch

PASS_SHIFT = 40  # progress = pass << 40 | batches copied out of that pass
WAIT_SECONDS = 50e-6


class Progress:
    """How far the main process has copied batches out: one int64 in shared memory."""

    def __init__(self) -> None:
        self._value = torch.zeros(1, dtype=torch.int64).share_memory_()

    def publish(self, pass_id: int, done: int) -> None:
        """Batches ``[0, done)`` of pass ``pass_id`` are copied out (one atomic 8-byte store)."""
        self._value[0] = (pass_id << PASS_SHIFT) | done

    def is_done(self, pass_id: int, batch: int) -> bool:
        """Whether batch ``batch`` of pass ``pass_id`` was copied out, or its pass abandoned."""
        value = int(self._value[0])
        current, done = value >> PASS_SHIFT, value & ((1 << PASS_SHIFT) - 1)
        return current > pass_id or (current == pass_id and done > batch)


class BatchRing:
    """A worker's ``size`` reusable shared buffers, handed out in turn."""

    def __init__(self, shape: tuple[int, ...], size: int, progress: Progress) -> None:
        self.buffers = [torch.empty(shape, dtype=torch.uint8).share_memory_() for _ in range(size)]
        self.owners: list[tuple[int, int] | None] = [None] * size
        self.progress = progress
        self._next = 0
        self._parent = os.getppid()

    def acquire(self, pass_id: int, batch: int) -> torch.Tensor:
        """The next buffer, once the batch it held has been copied out by the main process."""
        slot = self._next
        self._next = (slot + 1) % len(self.buffers)
        owner = self.owners[slot]
        while owner is not None and not self.progress.is_done(*owner):
            if os.getppid() != self._parent:
                raise SystemExit("the main process is gone")
            time.sleep(WAIT_SECONDS)
        self.owners[slot] = (pass_id, batch)
        return self.buffers[slot]
