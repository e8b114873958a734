import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks

from facescale.distributed import get_rank, get_world_size, init_distributed, shutdown


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)
    assert not dist.is_initialized()
    assert (get_rank(), get_world_size()) == (0, 1)
    shutdown()  # no group: a no-op


def test_partial_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed()


def _collect(rank, world):
    env = init_distributed()  # already initialised by the launcher: must return the same facts
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {
        "rank": env.rank,
        "world": env.world_size,
        "backend": env.backend,
        "helpers": (get_rank(), get_world_size()),
        "sum": value.item(),
        "threads": torch.get_num_threads(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
    }


@pytest.mark.parametrize("world", [1, 2])
def test_spawned_gloo_ranks(world):
    results = run_ranks(_collect, world)
    expected_sum = world * (world + 1) / 2
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world"] == world
        assert res["helpers"] == (rank, world)
        assert res["backend"] == "gloo"
        assert res["sum"] == expected_sum
        assert res["threads"] == max(1, len(os.sched_getaffinity(0)) // world)


@pytest.mark.parametrize(
    ("local_rank", "visible", "expected"),
    [(0, 8, 0), (5, 8, 5), (3, 1, 0), (7, 1, 0), (5, 4, 1)],
)
def test_local_ranks_map_onto_the_visible_devices(local_rank, visible, expected):
    from facescale.distributed import local_device

    assert local_device(local_rank, visible) == torch.device("cuda", expected)


def test_no_visible_device_is_a_clear_error():
    from facescale.distributed import local_device

    with pytest.raises(RuntimeError, match="no CUDA device"):
        local_device(0, 0)
