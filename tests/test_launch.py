"""facescale.launch: spawned ranks in a real gloo group, their failures, free ports, and
torchrun jobs run under a time limit."""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facescale.launch import free_port, run_with_time_limit, spawn_ranks, torchrun_command


def _reduce(rank: int, world: int, offset: float) -> dict:
    value = torch.tensor([float(rank) + offset])
    dist.all_reduce(value)
    return {"rank": rank, "world": world, "group_rank": dist.get_rank(), "sum": value.item()}


@pytest.mark.parametrize("world", [1, 3])
def test_each_rank_runs_in_one_group_and_results_come_back_in_rank_order(world):
    results = spawn_ranks(_reduce, world, 10.0)
    expected_sum = sum(rank + 10.0 for rank in range(world))
    assert [r["rank"] for r in results] == list(range(world))
    assert [r["group_rank"] for r in results] == list(range(world))
    assert all(r["world"] == world and r["sum"] == expected_sum for r in results)


def _fail_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one cannot go on")
    return rank


def test_an_exception_in_one_rank_names_that_rank_and_carries_its_error():
    with pytest.raises(mp.ProcessRaisedException, match="Process 1 terminated") as caught:
        spawn_ranks(_fail_on_rank_one, 2)
    assert "ValueError: rank one cannot go on" in str(caught.value)


def _mark_at_exit(rank: int, world: int, folder: str) -> int:
    atexit.register(Path(folder, f"teardown_{rank}").touch)
    return os.getpid()


def test_each_rank_runs_in_its_own_process_and_exits_through_its_exit_handlers(tmp_path):
    pids = spawn_ranks(_mark_at_exit, 2, str(tmp_path))
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert sorted(path.name for path in tmp_path.iterdir()) == ["teardown_0", "teardown_1"]


def test_free_port_can_be_bound_and_listened_on():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert sock.getsockname()[1] == port


PROBE = """import json, os, sys
with open(os.path.join(sys.argv[1], "rank_" + os.environ["RANK"]), "w") as out:
    json.dump({"world": os.environ["WORLD_SIZE"], "args": sys.argv[1:]}, out)
"""


def test_a_torchrun_command_runs_the_module_on_each_rank_with_its_arguments(tmp_path, monkeypatch):
    (tmp_path / "launch_probe.py").write_text(PROBE)
    paths = [str(tmp_path), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    command = torchrun_command(2, [str(tmp_path), "--flag"], module="launch_probe")
    assert command[0] == sys.executable
    assert run_with_time_limit(command, tmp_path / "log.txt", timeout=120)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank_{rank}").read_text())
        assert seen == {"world": "2", "args": [str(tmp_path), "--flag"]}


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def test_a_job_past_its_time_limit_is_stopped_with_every_process_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(300)\n"
    )
    started = time.monotonic()
    finished = run_with_time_limit([sys.executable, "-c", script], tmp_path / "log.txt", 8)
    assert not finished and time.monotonic() - started < 60
    assert (tmp_path / "log.txt").read_text() == "started\n"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
