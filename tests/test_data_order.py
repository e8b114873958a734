"""The per-rank read order: exact against a plain reference, disjoint, covering, per epoch."""

import numpy as np
import pytest

from facescale.data.order import SEED_TAG_BLOCKS, ReadOrder, batch_schedule
from facescale.seeding import rng_for


def make_order(n, world, rank=0, batch=4, block=5, window_batches=3, streams=2, seed=7):
    return ReadOrder(n, world, rank, batch, seed, block, window_batches, streams)


def reference_positions(order: ReadOrder, epoch: int) -> list[int]:
    """Lay the shuffled blocks end to end, cut equal slices, keep whole batches."""
    n, block = order.num_records, order.block
    blocks = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    perm = rng_for(order.seed, SEED_TAG_BLOCKS, epoch).permutation(len(blocks))
    sequence = [p for b in perm for p in blocks[b]]
    share = n // order.world_size
    keep = n // (order.world_size * order.batch_size) * order.batch_size
    return sequence[order.rank * share : order.rank * share + keep]


@pytest.mark.parametrize("seed", range(30))
def test_rank_positions_match_reference(seed):
    rng = np.random.default_rng(seed)
    world, batch = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    n = int(rng.integers(world * batch, 400))
    for block in (1, int(rng.integers(2, 40))):  # random access, and sequential blocks
        for rank in range(world):
            order = make_order(n, world, rank, batch, block=block, seed=seed)
            for epoch in (0, 3):
                assert order.epoch(epoch).positions.tolist() == reference_positions(order, epoch)


@pytest.mark.parametrize("n, world, batch", [(1000, 3, 8), (97, 2, 5), (64, 4, 16), (50, 1, 7)])
def test_ranks_disjoint_equal_and_cover_all_but_a_remainder(n, world, batch):
    for epoch in range(3):
        shares = []
        for rank in range(world):
            plan = make_order(n, world, rank, batch).epoch(epoch)
            batches = [plan.batch(j) for j in range(plan.order.num_batches)]
            assert all(len(b) == batch for b in batches)
            shares.append(np.concatenate(batches))
            assert sorted(shares[-1].tolist()) == sorted(plan.positions.tolist())
        assert len({len(s) for s in shares}) == 1
        everything = np.concatenate(shares)
        assert len(np.unique(everything)) == len(everything)  # disjoint
        assert set(everything.tolist()) <= set(range(n))
        assert n - len(everything) < world * batch  # only the remainder is dropped


def test_every_record_is_read_over_epochs():
    n, world, batch = 103, 2, 8
    seen = set()
    for epoch in range(12):
        for rank in range(world):
            seen |= set(make_order(n, world, rank, batch).epoch(epoch).positions.tolist())
    assert seen == set(range(n))


def test_order_changes_per_epoch_and_repeats_per_seed():
    def batches(epoch, seed=7):
        plan = make_order(200, 2, 1, seed=seed).epoch(epoch)
        return [plan.batch(j).tolist() for j in range(plan.order.num_batches)]

    assert batches(0) == batches(0)
    assert batches(0) != batches(1)
    assert batches(0, seed=8) != batches(0)


def test_window_is_few_contiguous_runs_and_batches_stay_in_it():
    order = make_order(10_000, 2, 1, batch=32, block=128, window_batches=16, streams=2)
    plan = order.epoch(4)
    window = plan.window(3)
    runs = 1 + np.count_nonzero(np.diff(window) != 1)
    assert runs <= len(window) // order.block + 2
    inside = [j for j in range(order.num_batches) if plan.window_of(j) == 3]
    assert len(inside) == 16
    members = np.concatenate([plan.batch(j) for j in inside])
    assert sorted(members.tolist()) == sorted(window.tolist())
    assert members.tolist() != window.tolist()  # shuffled inside the window


@pytest.mark.parametrize("num_batches, window_batches, streams", [(10, 3, 2), (7, 7, 3), (9, 2, 1)])
def test_schedule_alternates_streams(num_batches, window_batches, streams):
    schedule = batch_schedule(num_batches, window_batches, streams)
    pairs = [tuple(r) for r in schedule.tolist()]
    assert len(pairs) == num_batches and len(set(pairs)) == num_batches
    full = (num_batches // (window_batches * streams)) * window_batches * streams
    for j, (window, _) in enumerate(pairs[:full]):
        assert window % streams == j % streams  # worker j % streams holds this window


def test_impossible_orders_are_explained():
    with pytest.raises(ValueError, match="make no batch"):
        make_order(7, 2, batch=4)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        make_order(100, 2, rank=2)
