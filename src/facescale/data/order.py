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

SEED_TAG_BLOCKS, SEED_TAG_WINDOW, SEED_TAG_AUGMENT = 0, 1, 2


def rng_for(*keys: int) -> np.random.Generator:
    """A generator determined by integer keys (seed, tag, epoch, rank, ...)."""
    return np.random.default_rng([int(k) for k in keys])


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
    """Record positions (file order indices) this rank reads in ``epoch``, in reading order."""
    n, block = order.num_records, order.block
    starts = rng_for(order.seed, SEED_TAG_BLOCKS, epoch).permutation(-(-n // block)) * block
    lengths = np.minimum(block, n - starts)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    share = n // order.world_size
    lo = order.rank * share
    hi = lo + order.num_batches * order.batch_size
    first = int(np.searchsorted(bounds, lo, side="right")) - 1
    last = int(np.searchsorted(bounds, hi, side="left"))
    pieces = []
    for b in range(first, last):
        a, z = max(lo, bounds[b]), min(hi, bounds[b + 1])
        pieces.append(np.arange(starts[b] + a - bounds[b], starts[b] + z - bounds[b]))
    return np.concatenate(pieces)


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
        shuffle = rng_for(o.seed, SEED_TAG_WINDOW, self.epoch, o.rank, window)
        perm = shuffle.permutation(len(members))
        return members[perm[t * o.batch_size : (t + 1) * o.batch_size]]
