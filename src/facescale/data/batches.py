"""Whole training batches, made from scratch from ``(pass, epoch, batch)``.

A batch is read (its window, kept in memory for the following batches), decoded, augmented
with a generator seeded by (seed, epoch, rank, batch), and written as uint8 [B,3,112,112]:
in a worker process straight into a shared buffer the main process maps once (ring.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from facescale.data.augment import draw_flips, place_chw, strong_augment
from facescale.data.image import FACE_SIZE
from facescale.data.order import SEED_TAG_AUGMENT, EpochPlan, ReadOrder, rng_for
from facescale.data.recordio import RecordError
from facescale.data.ring import BatchRing, Progress
from facescale.data.sources import Source


class BatchMaker(Dataset):
    """Makes batch ``j`` of an epoch from scratch; keeps the last window it read in memory.

    An index is ``(pass, epoch, batch)``; the pass numbers iterations for the shared buffers
    that worker processes fill (see ring.py).
    """

    def __init__(
        self, source: Source, order: ReadOrder, augment: str, skip_bad: bool, ring_size: int = 4
    ) -> None:
        self.source, self.order, self.augment, self.skip_bad = source, order, augment, skip_bad
        self.progress = Progress()
        self.ring_size = ring_size
        self._ring: BatchRing | None = None
        self._plan: EpochPlan | None = None
        self._window_key: tuple[int, int] | None = None
        self._window: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.order.num_batches

    def _plan_for(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch or self._plan.order != self.order:
            self._plan = self.order.epoch(epoch)
        return self._plan

    def _raw(self, plan: EpochPlan, batch: int) -> dict[int, Any]:
        key = (plan.epoch, plan.window_of(batch))
        if key != self._window_key:
            self._window = {}  # free the old window before reading the next
            members = plan.window(key[1])
            self._window = dict(zip(members.tolist(), self.source.fetch(members), strict=True))
            self._window_key = key
        return self._window

    def _images(self, pass_id: int, batch: int) -> torch.Tensor:
        """Where batch ``batch`` goes: a reused shared buffer in a worker, else new memory."""
        shape = (self.order.batch_size, 3, FACE_SIZE, FACE_SIZE)
        if get_worker_info() is None:
            return torch.empty(shape, dtype=torch.uint8)
        if self._ring is None:
            self._ring = BatchRing(shape, self.ring_size, self.progress)
        return self._ring.acquire(pass_id, batch)

    def __getitem__(
        self, index: tuple[int, int, int]
    ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        pass_id, epoch, batch = index
        plan = self._plan_for(epoch)
        raw = self._raw(plan, batch)
        positions = plan.batch(batch)
        out = self._images(pass_id, batch)
        images = out.numpy()
        labels = np.empty(len(positions), dtype=np.int64)
        rng = rng_for(self.order.seed, SEED_TAG_AUGMENT, epoch, self.order.rank, batch)
        flips = draw_flips(len(positions), self.augment, rng)
        bad: dict[int, str] = {}  # slot -> what was wrong
        for i, p in enumerate(positions.tolist()):
            try:
                labels[i], image = self.source.parse(p, raw[p])
            except RecordError as err:
                if not self.skip_bad:
                    raise
                bad[i] = str(err)
                continue
            if self.augment == "strong":
                image = strong_augment(image, rng)
            place_chw(images[i], image, flips[i])
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


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 in [-1, 1], as arcface_torch's Normalize(mean=0.5, std=0.5).

    ``(x - 127.5) / 127.5`` is exact before its final rounding, so 0 and 255 give -1 and 1.
    """
    return images.to(torch.float32).sub_(127.5).div_(127.5)
