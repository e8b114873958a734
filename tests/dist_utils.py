"""Run a function on several real gloo ranks (spawned processes) for multi-process tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from facescale.distributed import init_distributed, shutdown

    init_distributed(timeout_minutes=5)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        shutdown()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes with a gloo group.

    ``fn`` must be importable (module level); its return values come back by rank.
    An exception in any rank fails the caller with that rank's traceback.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
        return [results[r] for r in range(world)]
