"""The order in which each rank reads the records of an epoch: a pure function of its inputs.

The file is cut into blocks of consecutive records; each epoch shuffles the blocks and lays
them end to end. Rank ``r`` takes the ``r``-th of ``world_size`` equal slices of that sequence,
cut to a whole number of batches (every rank gets ``num_records // (world_size * batch_size)``
batches; the remainder is dropped, a different one each epoch). The slice is read window by
window; a window (``window_batches`` batches) is read into memory and shuffled there.
``streams`` windows are read side by side, one per worker process, their batches alternating.

Random access is the same walk with one-record blocks and one-batch windows. Batch ``j`` of
an epoch is computed on its own, so any worker can make any batch and a run resumes exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from facescale.seeding import rng_for

SEED_TAG_BLOCKS, SEED_TAG_WINDOW, SEED_TAG_AUGMENT = 0, 1, 2


@dataclass(frozen=True)
class ReadOrder:
    """Everything the order of one rank's batches depends on."""

    num_records: int
    world_size: int
    rank: int
    batch_size: int
    seed: int
    block: int
    window_batches: int
    streams: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        if min(self.batch_size, self.block, self.window_batches, self.streams) < 1:
            raise ValueError(f"batch_size, block, window_batches, streams must be >= 1: {self}")
        if self.num_batches == 0:
            raise ValueError(
                f"{self.num_records} records make no batch of {self.batch_size} on each of "
                f"{self.world_size} ranks; lower batch_size or add data"
            )

    @property
    def num_batches(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.num_records // (self.world_size * self.batch_size)

    def epoch(self, epoch: int) -> EpochPlan:
        return EpochPlan(self, epoch)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def rank_positions(order: ReadOrder, epoch: int) -> np.ndarray:
    """Record positions (file order indices) this rank reads in ``epoch``, in reading order.

    Only the blocks of this rank's slice are expanded; where a block starts in the epoch's
    sequence is arithmetic, since all blocks are full except the file's last.
    """
    n, block = order.num_records, order.block
    num_blocks = -(-n // block)
    lo = order.rank * (n // order.world_size)
    hi = lo + order.num_batches * order.batch_size
    perm = rng_for(order.seed, SEED_TAG_BLOCKS, epoch).permutation(num_blocks)
    if block == 1:
        return perm[lo:hi]
    short = n - (num_blocks - 1) * block  # length of the file's last block
    q = int(np.flatnonzero(perm == num_blocks - 1)[0])  # where that block lands

    def slot_start(slot: np.ndarray) -> np.ndarray:
        return slot * block - (block - short) * (slot > q)

    def slot_of(position: int) -> int:
        if position < q * block + short:
            return min(position // block, q)
        return q + 1 + (position - q * block - short) // block

    slots = np.arange(slot_of(lo), slot_of(hi - 1) + 1)
    seq_start = slot_start(slots)
    lengths = np.where(perm[slots] == num_blocks - 1, short, block)
    first = np.maximum(lo, seq_start)
    counts = np.minimum(hi, seq_start + lengths) - first
    file_first = perm[slots] * block + (first - seq_start)
    offsets = np.cumsum(counts) - counts
    return np.repeat(file_first - offsets, counts) + np.arange(hi - lo)


def batch_schedule(num_batches: int, window_batches: int, streams: int) -> np.ndarray:
    """For each batch of the epoch, ``(window, index within the window)``, shape [num_batches, 2].

    Windows are taken ``streams`` at a time and their batches alternate, so in a full group
    batch ``j`` belongs to stream ``j % streams``: the worker that gets it holds that window.
    """
    num_windows = -(-num_batches // window_batches)
    rows = []
    for group in range(0, num_windows, streams):
        windows = range(group, min(group + streams, num_windows))
        sizes = {w: min(window_batches, num_batches - w * window_batches) for w in windows}
        for t in range(window_batches):
            rows.extend((w, t) for w in windows if t < sizes[w])
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class EpochPlan:
    """One rank's batches of one epoch: which window each comes from and which records."""

    def __init__(self, order: ReadOrder, epoch: int) -> None:
        self.order, self.epoch = order, epoch
        self._shuffles: dict[int, np.ndarray] = {}  # the windows read at the moment

    @cached_property
    def positions(self) -> np.ndarray:
        return rank_positions(self.order, self.epoch)

    @cached_property
    def schedule(self) -> np.ndarray:
        o = self.order
        return batch_schedule(o.num_batches, o.window_batches, o.streams)

    def window_of(self, batch: int) -> int:
        return int(self.schedule[batch, 0])

    def window(self, window: int) -> np.ndarray:
        """Record positions of a window, in reading order."""
        size = self.order.window_batches * self.order.batch_size
        return self.positions[window * size : (window + 1) * size]

    def batch(self, batch: int) -> np.ndarray:
        """Record positions of batch ``batch``: a shuffled slice of its window."""
        o = self.order
        window, t = (int(v) for v in self.schedule[batch])
        members = self.window(window)
        if window not in self._shuffles:
            if len(self._shuffles) >= o.streams:
                self._shuffles.pop(next(iter(self._shuffles)))
            shuffle = rng_for(o.seed, SEED_TAG_WINDOW, self.epoch, o.rank, window)
            self._shuffles[window] = shuffle.permutation(len(members))
        return members[self._shuffles[window][t * o.batch_size : (t + 1) * o.batch_size]]
