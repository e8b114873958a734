"""Starting ranks on this machine: spawned processes that run a function in a process group,
or a torchrun job that runs a module, with an optional time limit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the rendezvous address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(
    nproc: int,
    args: Sequence[str],
    *,
    module: str = "facescale",
    torchrun_options: Sequence[str] = ("--standalone",),
) -> list[str]:
    """``python -m torch.distributed.run OPTIONS --nproc_per_node=NPROC -m MODULE ARGS``,
    with this interpreter, so the job runs in the same environment as the caller."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_options,
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]


def run_with_time_limit(command: Sequence[str], log_path: Path, timeout: float) -> bool:
    """Run ``command`` with its output in ``log_path``; True when it exits by itself, False
    when it outlives ``timeout`` seconds. Stopping kills its whole session (every rank)."""
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        finally:
            if job.poll() is None:  # timed out, or this process is being interrupted
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    return True


def _rank_entry(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    timeout_minutes: float,
    backend: str | None,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from facescale.distributed import init_distributed, shutdown

    init_distributed(timeout_minutes=timeout_minutes, backend=backend)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        shutdown()


def spawn_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_minutes: float = 30.0,
    backend: str | None = None,
) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes, each in one process
    group (:func:`facescale.distributed.init_distributed`: gloo on CPU, NCCL on CUDA) that
    rendezvous on a free local port; return the values ``fn`` returned, in rank order.

    ``fn`` must be importable (module level) and its arguments and results picklable. An
    exception in a rank raises ``torch.multiprocessing.ProcessRaisedException`` naming the
    rank and carrying its traceback. ``timeout_minutes`` bounds each collective's wait;
    ``backend`` replaces the group's default ('gloo' lets ranks share one GPU).
    """
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _rank_entry,
            args=(world, free_port(), fn, args, results, timeout_minutes, backend),
            nprocs=world,
            join=True,
        )
        return [results[rank] for rank in range(world)]
