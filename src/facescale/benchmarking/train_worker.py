"""One configuration of `facescale bench train`, run on every rank under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=R \
        -m facescale.benchmarking.train_worker SPEC.json

Builds the trainer the spec's config describes, runs warm-up steps, then timed steps, and
measures this rank's peak memory from before the model and head exist. Rank 0 writes
``result.json`` (every rank's figures) into the spec's folder. A rank that fails writes
``failed_rank<r>.json`` (the error, and whether it ran out of memory); out of memory it
exits at once with :data:`OOM_EXIT`, so torchrun stops the other ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from facescale.memory import PeakMemory, process_memory
from facescale.train.logger import RunLogger
from facescale.train.trainer import Trainer

OOM_EXIT = 3
# profiler events of collectives: gloo's ranges; NCCL's ranges and its CUDA kernels
COMM_PREFIXES = ("gloo:", "nccl")


@dataclass(frozen=True)
class RunSpec:
    """What one configuration runs; the parent writes it as JSON for the worker."""

    overrides: list[str]  # config `key=value` items
    warmup: int
    steps: int
    result_dir: str
    memory_limit: int | None = None  # bytes each CPU rank may add to its data segment
    comm: bool = False  # then profile as many steps to time collectives in flight

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> RunSpec:
        return cls(**json.loads(path.read_text()))


def cap_memory(limit: int) -> None:
    """Let this process's data segment grow by at most ``limit`` bytes: a larger allocation
    then fails with an error instead of waking the kernel's out-of-memory killer."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = process_memory("VmData") + limit
    resource.setrlimit(resource.RLIMIT_DATA, (soft if hard < 0 else min(soft, hard), hard))


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed for lack of memory, on CPU (rlimit or RAM) or GPU."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def communication_seconds(events: Any) -> float:
    """Wall time during which at least one collective was in flight (union of intervals)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.name.startswith(COMM_PREFIXES)
    )
    total, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total / 1e6  # the profiler counts microseconds


def _profiled_fit(trainer: Trainer, logger: RunLogger, stop_step: int) -> tuple[float, float]:
    """Run up to ``stop_step`` under the profiler: wall seconds, and seconds during which a
    collective was in flight."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.fit(logger, stop_step)
    return time.perf_counter() - started, communication_seconds(prof.events())


def measure(spec: RunSpec, env: Any) -> dict[str, Any]:
    """Build the trainer, run warm-up then timed steps (then profiled steps with ``comm``);
    this rank's figures."""
    from facescale.config import load_config

    cfg = load_config(None, spec.overrides)
    memory = PeakMemory(env.device)
    memory.start()
    trainer = Trainer(cfg, env)
    timed_end = spec.warmup + spec.steps
    needed = timed_end + (spec.steps if spec.comm else 0)
    steps_per_epoch = trainer.schedule.steps_per_epoch
    if steps_per_epoch <= needed:
        raise ValueError(
            f"rec={cfg.rec}: an epoch is {steps_per_epoch} steps of {cfg.batch_size} "
            f"images per rank, but the benchmark needs {needed + 1} without an epoch end; "
            "use a larger record file or fewer --steps/--warmup"
        )
    with contextlib.closing(trainer.open_logger()) as logger:
        trainer.fit(logger, spec.warmup)
        trainer.reset_timings()
        trainer.fit(logger, timed_end)
        timings = dict(trainer.timings)
        if spec.comm:
            profiled = _profiled_fit(trainer, logger, needed)
    result = {
        "rank": env.rank,
        "timings": timings,
        "threads": torch.get_num_threads(),
        "baseline_bytes": memory.base,
        **memory.peak(),
    }
    if spec.comm:
        result["profiled_s"], result["comm_s"] = profiled
    return result


def _write(path: Path, value: Any) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(value))
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    from facescale.distributed import gather_objects, init_distributed, shutdown

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m facescale.benchmarking.train_worker SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec.load(Path(args[0]))
    folder = Path(spec.result_dir)
    env = init_distributed()
    if env.device.type == "cpu" and spec.memory_limit is not None:
        cap_memory(spec.memory_limit)
    try:
        mine = measure(spec, env)
    except BaseException as err:
        oom = is_out_of_memory(err)
        failure = {"rank": env.rank, "time": time.time(), "oom": oom}
        _write(folder / f"failed_rank{env.rank}.json", failure | {"error": str(err)[:500]})
        if not oom:
            raise
        sys.stdout.flush()
        os._exit(OOM_EXIT)  # no clean-up that could wait on ranks still inside a collective
    ranks = gather_objects(mine)
    if env.is_main:
        _write(folder / "result.json", {"ranks": ranks})
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
