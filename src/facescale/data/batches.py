"""Whole training batches, each made from scratch from the task the main process sends.

A batch is read (its window, kept in memory for the following batches), decoded, augmented
with a generator seeded by (seed, epoch, rank, batch), and written as uint8 [B,3,112,112]:
in a worker process straight into a shared buffer the main process maps once (ring.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from facescale.data.augment import Augmentation, place_chw
from facescale.data.order import SEED_TAG_AUGMENT, EpochPlan, ReadOrder
from facescale.data.recordio import RecordError
from facescale.data.ring import BatchRing, Progress
from facescale.data.sources import Source
from facescale.face import FACE_SIZE
from facescale.seeding import rng_for


@dataclass(frozen=True)
class BatchTask:
    """Everything a worker needs to make one batch; the main process plans it (order.py)."""

    pass_id: int
    epoch: int
    batch: int
    order: ReadOrder
    window: int
    members: np.ndarray  # the records of the batch's window, in reading order
    positions: np.ndarray  # the batch's records

    @classmethod
    def of(cls, plan: EpochPlan, pass_id: int, batch: int) -> BatchTask:
        window = plan.window_of(batch)
        return cls(
            pass_id, plan.epoch, batch, plan.order, window, plan.window(window), plan.batch(batch)
        )


class BatchMaker(Dataset):
    """Makes the batch a BatchTask describes; keeps the last window it read in memory."""

    def __init__(
        self,
        source: Source,
        augmentation: Augmentation,
        skip_bad: bool,
        ring_size: int,
    ) -> None:
        self.source, self.augmentation, self.skip_bad = source, augmentation, skip_bad
        self.progress = Progress()
        self.ring_size = ring_size
        self._ring: BatchRing | None = None
        self._window_key: tuple[ReadOrder, int, int] | None = None
        self._window: dict[int, Any] = {}

    def _raw(self, task: BatchTask) -> dict[int, Any]:
        key = (task.order, task.epoch, task.window)
        if key != self._window_key:
            self._window = {}  # free the old window before reading the next
            fetched = self.source.fetch(task.members)
            self._window = dict(zip(task.members.tolist(), fetched, strict=True))
            self._window_key = key
        return self._window

    def _images(self, task: BatchTask) -> torch.Tensor:
        """Where the batch goes: a reused shared buffer in a worker, else new memory."""
        shape = (task.order.batch_size, 3, FACE_SIZE, FACE_SIZE)
        if get_worker_info() is None:
            return torch.empty(shape, dtype=torch.uint8)
        if self._ring is None:
            self._ring = BatchRing(shape, self.ring_size, self.progress)
        return self._ring.acquire(task.pass_id, task.batch)

    def __getitem__(self, task: BatchTask) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        raw = self._raw(task)
        positions = task.positions
        out = self._images(task)
        images = out.numpy()
        labels = np.empty(len(positions), dtype=np.int64)
        o = task.order
        rng = rng_for(o.seed, SEED_TAG_AUGMENT, task.epoch, o.rank, task.batch)
        flips = self.augmentation.flips(len(positions), rng)
        bad: dict[int, str] = {}  # slot -> what was wrong
        for i, p in enumerate(positions.tolist()):
            try:
                labels[i], image = self.source.parse(p, raw[p])
            except RecordError as err:
                if not self.skip_bad:
                    raise
                bad[i] = str(err)
                continue
            place_chw(images[i], self.augmentation(image, rng), flips[i])
        if bad:
            replace_bad(images, labels, bad)
        return out, labels, list(bad.values())


def replace_bad(images: np.ndarray, labels: np.ndarray, bad: dict[int, str]) -> None:
    """Fill skipped slots with copies of the batch's good samples, keeping the batch size."""
    slots = list(bad)
    good = np.setdiff1d(np.arange(len(labels)), slots)
    if not good.size:
        raise RecordError(f"every record of a batch is bad; the first: {bad[slots[0]]}")
    donors = good[np.arange(len(slots)) % good.size]
    images[slots], labels[slots] = images[donors], labels[donors]
