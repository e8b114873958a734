import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks

from facescale.distributed import get_rank, get_world_size, init_distributed, shutdown
from facescale.heads import ArcFace, PartialFC
from facescale.launch import torchrun_command


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


def _gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (its workers and its I/O loop)."""
    names = (Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    return [name for name in names if "gloo" in name]


def _train_a_head_then_shut_down(rank: int, world: int) -> dict[str, list[str]]:
    import torch._dynamo  # imported once the group exists, as torch.optim does on first use

    head = PartialFC(30 * world, 16, ArcFace(64.0, 0.5))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(2):
        head(torch.randn(4, 16, requires_grad=True), torch.randint(0, 30 * world, (4,))).backward()
        optimizer.step()
    during = _gloo_threads()
    shutdown()
    return {"during": during, "after": _gloo_threads()}


def test_shutdown_ends_every_gloo_thread_whatever_was_imported_after_the_group():
    for threads in run_ranks(_train_a_head_then_shut_down, 3):
        assert threads["during"] and threads["after"] == []


TEARDOWN_JOB = """import torch
from facescale.distributed import init_distributed, shutdown
from facescale.heads import ArcFace, PartialFC

env = init_distributed()
head = PartialFC(90, 16, ArcFace(64.0, 0.5))
optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
for _ in range(2):
    head(torch.randn(4, 16, requires_grad=True), torch.randint(0, 90, (4,))).backward()
    optimizer.step()
shutdown()
"""


@pytest.mark.slow
def test_a_finished_three_rank_job_exits_0_every_time(tmp_path, monkeypatch):
    (tmp_path / "teardown_job.py").write_text(TEARDOWN_JOB)
    paths = [str(tmp_path), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    for attempt in range(10):
        job = subprocess.run(
            torchrun_command(3, [], module="teardown_job"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert job.returncode == 0, f"run {attempt}: {job.stderr[-3000:]}"


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
