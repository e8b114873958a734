"""Process-group setup: torchrun's environment or a single process, one code path for both.

NCCL on CUDA, gloo on CPU. Every helper here works whether or not a process group exists,
so library code calls ``get_rank()`` / ``get_world_size()`` and never branches on the mode.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions take ``group=group.WORLD`` as a
# default argument, evaluated at import. torch._dynamo imports it (and torch.optim imports
# torch._dynamo on first use), so imported later it would hold the default group for good,
# past destroy_process_group, and with it gloo's worker threads (see shutdown()).
import torch.distributed.nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (``[value]`` without a process group)."""
    if not is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def job_store(timeout: datetime.timedelta = datetime.timedelta(seconds=30)) -> dist.Store | None:
    """The key-value store torchrun's agent keeps for the whole job, restarts included; None
    when this process was not started by torchrun's agent."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), timeout=timeout)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under a torchrun restart, a key space of this attempt's own in the agent's store, so
    the new ranks never read the addresses the previous attempt's ranks published."""
    store = job_store(timeout)
    if store is None:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"facescale/attempt_{attempt}", store)


def local_device(local_rank: int, visible_devices: int) -> torch.device:
    """The CUDA device of local rank ``local_rank`` among ``visible_devices`` visible GPUs.

    Launchers that show each process all of a node's GPUs give local rank r the r-th; those
    that show each process only its own (SLURM with per-task CUDA_VISIBLE_DEVICES) give
    every process ``cuda:0``.
    """
    if visible_devices < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    return torch.device("cuda", local_rank % visible_devices)


def init_distributed(timeout_minutes: float = 30.0, backend: str | None = None) -> DistEnv:
    """Join the process group torchrun describes, or set up a single process without one.

    Under torchrun (RANK and WORLD_SIZE set) a process group is created even for one rank,
    so single- and multi-rank runs take the same path. On CPU each rank gets an equal share
    of the cores it may run on, so ranks on one machine do not oversubscribe it. ``backend``
    replaces the default (NCCL with GPUs, else gloo): 'gloo' lets ranks share one GPU.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if not launched:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistEnv(0, 1, 0, device, None)

    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not; "
            "launch with torchrun, or unset RANK and WORLD_SIZE for a single process"
        )
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        device = local_device(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_world)))
    if not is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    return DistEnv(rank, world, local_rank, device, backend)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if any; safe to call twice.

    Destroying the group ends its gloo worker threads, as long as nothing else holds the
    group (hence the early import of torch.distributed.nn above). A worker that outlived
    this call could still be releasing a finished collective when the interpreter exits;
    the release takes the GIL, which a finalizing interpreter never gives back, and the
    process aborts with "terminate called without an active exception".
    """
    if is_initialized():
        dist.destroy_process_group()
