"""`facescale bench head`: one training step of the classification layer alone, on N ranks.

Each step is forward, backward and the centers' update (SGD, momentum 0.9, weight decay
5e-4) on random embeddings and labels, for each loss asked for in turn (ArcFace by default;
the report compares the others' step times with the first's). Reported against two
references measured in the same run: the matmul floor, ``3 x 2 x rows x classes_computed x
subcenters x dim`` FLOPs (logits,
gradient to the embeddings, gradient to the centers) at the sgemm rate each rank gets
right after each step with its own thread count, and the memory budget, 1.15 x (centers +
optimizer state) + 512 MB of peak resident memory growth from before the head is built.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from facescale.benchmarking import print_report
from facescale.launch import spawn_ranks

HELP = "time the classification head alone (model parallel, Partial FC, data parallel)"

SPEED_TARGETS = {"model_parallel": 1.5, "partial_fc": 2.0}  # step / matmul floor
MEMORY_FACTOR, MEMORY_SLACK_MB = 1.15, 512.0


@dataclass(frozen=True)
class Options:
    kind: str
    lean: bool
    classes: int
    world: int
    batch: int
    dim: int
    sample_rate: float
    chunk_size: int
    cache_mib: int
    dtype: str
    steps: int
    warmup: int
    threads: int
    lr: float
    losses: tuple[str, ...] = ("arcface",)
    num_subcenters: int = 1
    center_dtype: str = "fp32"  # storage of the lean head's centers and momentum
    center_state_dtype: str = "fp32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facescale.heads.losses import LOSS_NAMES
    from facescale.heads.partial_fc import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_SIZE

    parser.add_argument(
        "--kind",
        choices=("partial_fc", "data_parallel"),
        default="partial_fc",
        help="partial_fc: centers sharded over the ranks; data_parallel: every rank holds all",
    )
    parser.add_argument(
        "--mode",
        choices=("lean", "dropin"),
        default=None,
        help="lean: the head updates its centers in chunks (default for partial_fc); "
        "dropin: a torch SGD optimizer over head.parameters() (the only mode of data_parallel)",
    )
    parser.add_argument("--classes", type=int, default=1_000_000, help="number of identities")
    parser.add_argument("--world", type=int, default=2, help="ranks (processes) to spawn")
    parser.add_argument("--batch", type=int, default=128, help="embeddings per rank")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help=f"classes whose logits are computed at a time (default: {DEFAULT_CHUNK_SIZE} on "
        "CPU; on a GPU as many as 1 GiB of buffers holds, as in training)",
    )
    parser.add_argument(
        "--cache-mib",
        type=int,
        default=DEFAULT_CACHE_BYTES // 2**20,
        help="MiB the lean head may keep the softmax in between forward and update (0: "
        "recompute the logits in the update)",
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of the logits"
    )
    parser.add_argument(
        "--center-dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="storage of the lean head's centers (its math stays fp32)",
    )
    parser.add_argument(
        "--center-state-dtype",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="storage of the lean head's momentum",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads per rank (default: CPU cores / ranks)"
    )
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the head's SGD")
    parser.add_argument(
        "--loss",
        nargs="+",
        choices=LOSS_NAMES,
        default=["arcface"],
        help="the loss, or several measured one after another in the same run (their step "
        "times are compared with the first's)",
    )
    parser.add_argument(
        "--subcenters", type=int, default=1, help="centers per class (sub-center ArcFace)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    lean = (args.mode or ("lean" if args.kind == "partial_fc" else "dropin")) == "lean"
    problem = None
    if args.world < 1 or args.steps < 1 or args.warmup < 0 or args.cache_mib < 0:
        problem = "--world and --steps must be >= 1, --warmup and --cache-mib >= 0"
    elif args.subcenters < 1:
        problem = "--subcenters must be >= 1"
    elif args.kind == "data_parallel" and {"adaface", "curricularface"} & set(args.loss):
        problem = "--kind data_parallel does not keep AdaFace's or CurricularFace's state"
    elif args.kind == "data_parallel" and (lean or args.sample_rate != 1):
        problem = "--kind data_parallel takes --mode dropin and --sample-rate 1"
    elif not lean and (args.center_dtype, args.center_state_dtype) != ("fp32", "fp32"):
        problem = "--center-dtype and --center-state-dtype other than fp32 need --mode lean"
    if problem:
        print(f"facescale bench head: error: {problem}", file=sys.stderr)
        return 2
    import torch

    from facescale.heads.partial_fc import chunk_size_for

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the ranks' (init_distributed)
    options = Options(
        args.kind,
        lean,
        args.classes,
        args.world,
        args.batch,
        args.dim,
        args.sample_rate,
        args.chunk_size or chunk_size_for(device, args.batch * args.world, args.dim),
        args.cache_mib,
        args.dtype,
        args.steps,
        args.warmup,
        args.threads,
        args.lr,
        tuple(args.loss),
        args.subcenters,
        args.center_dtype,
        args.center_state_dtype,
    )
    ranks = spawn_ranks(_measure_on_rank, args.world, options)
    by_loss = [summarize(options, [r[i] for r in ranks]) for i in range(len(options.losses))]
    print_report(compare_losses(options.losses, by_loss), args.json)
    return 0


def _measure_on_rank(rank: int, world: int, options: Options) -> list[dict[str, Any]]:
    import torch

    from facescale.distributed import init_distributed

    env = init_distributed()  # the group spawn_ranks set up: this rank's device
    if options.threads:
        torch.set_num_threads(options.threads)
    return [measure_rank(options, env.device, loss) for loss in options.losses]


# ---- one rank --------------------------------------------------------------------------
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds of a section (CPU time ignores other programs' load)."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def sgemm_gflops(
    shapes: list[tuple[int, int, int]], dtype: Any, device: Any, repeats: int = 10
) -> dict[str, float]:
    """Wall-clock and CPU-time rates (GFLOP/s) of ``[m x k] @ [k x n]``: for each shape the
    mean over ``repeats`` back-to-back products (a sustained rate, as a step sustains it),
    then the best shape."""
    import torch

    best = {"wall": 0.0, "cpu": 0.0}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        torch.mm(a, b)
        with Clock(device) as clock:
            for _ in range(repeats):
                torch.mm(a, b)
        for kind in best:
            seconds = max(getattr(clock, kind), 1e-9)
            best[kind] = max(best[kind], 2 * m * k * n * repeats / seconds / 1e9)
    return best


def measure_rank(options: Options, device: Any, loss: str = "arcface") -> dict[str, Any]:
    """Build the head with ``loss`` on this rank, run warm-up and timed steps, and measure
    them."""
    import gc

    import torch

    from facescale.distributed import barrier, get_rank, get_world_size
    from facescale.heads import build_head
    from facescale.heads.losses import build_margin
    from facescale.heads.options import resolve_logits_dtype
    from facescale.memory import PeakMemory
    from facescale.seeding import rank_seed

    dtype = resolve_logits_dtype(options.dtype)
    storage = {}
    if options.lean:
        storage = {
            "center_dtype": options.center_dtype,
            "center_state_dtype": options.center_state_dtype,
        }
    gc.collect()
    memory = PeakMemory(device)
    memory.start()
    head = build_head(
        options.kind,
        options.classes,
        options.dim,
        build_margin(loss, 64.0, (1.0, 0.0, 0.4) if loss == "cosface" else (1.0, 0.5, 0.0)),
        options.sample_rate,
        lean=options.lean,
        num_subcenters=options.num_subcenters,
        chunk_size=options.chunk_size,
        cache_bytes=options.cache_mib * 2**20,
        logits_dtype=dtype,
        seed=0,
        device=device,
        **storage,
    ).to(device)
    optimizer = None
    if options.lean:
        head.configure_optimizer("sgd", lr=options.lr, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.SGD(
            head.parameters(), lr=options.lr, momentum=0.9, weight_decay=5e-4
        )
    generator = torch.Generator(device=device).manual_seed(rank_seed(0, get_rank()))
    global_batch = options.batch * get_world_size()
    rows = options.batch if options.kind == "data_parallel" else global_batch
    shapes = [(1024, 1024, 1024), (rows, options.dim, options.chunk_size)]
    steps, rates, computed = [], [], []
    for index in range(options.warmup + options.steps):
        x = torch.randn(options.batch, options.dim, device=device, generator=generator)
        labels = torch.randint(
            0, options.classes, (options.batch,), device=device, generator=generator
        )
        x.requires_grad_()
        barrier()
        with Clock(device) as clock:
            head(x, labels).backward()
            if optimizer is None:
                head.step(options.lr)
            else:
                optimizer.step()
            head.zero_grad()
        barrier()
        rate = sgemm_gflops(shapes, dtype, device)
        if index >= options.warmup:
            steps.append({"wall": clock.wall, "cpu": clock.cpu})
            rates.append(rate)
            sampled = getattr(head, "sampled_classes", None)
            computed.append(head.num_local if sampled is None else len(sampled))
    growth = memory.peak()["peak_bytes"]
    state = [t for t in head.state_dict().values() if torch.is_tensor(t)]
    if optimizer is not None:
        state += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "steps": steps,
        "sgemm_gflops": rates,
        "rows": rows,
        "classes_computed": max(computed),
        "subcenters": options.num_subcenters,
        "threads": torch.get_num_threads(),
        "memory_growth_mb": growth / 2**20,
        "state_mb": sum(t.numel() * t.element_size() for t in state) / 2**20,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


# ---- the report ------------------------------------------------------------------------
def _against_floor(ranks: list[dict[str, Any]], dim: int, clock: str) -> dict[str, Any]:
    """Per step: the slowest rank's time, the floor at that step's sgemm rates, their ratio."""
    steps = range(len(ranks[0]["steps"]))
    flops = [6 * r["rows"] * r["classes_computed"] * r["subcenters"] * dim for r in ranks]
    slowest = [max(r["steps"][i][clock] for r in ranks) for i in steps]
    floors = [
        max(f / (r["sgemm_gflops"][i][clock] * 1e9) for f, r in zip(flops, ranks, strict=True))
        for i in steps
    ]
    return {
        "step_s": slowest,
        "step_s_median": statistics.median(slowest),
        "sgemm_gflops_median": statistics.median(
            min(r["sgemm_gflops"][i][clock] for r in ranks) for i in steps
        ),
        "floor_s_median": statistics.median(floors),
        "step_over_floor_median": statistics.median(
            step / floor for step, floor in zip(slowest, floors, strict=True)
        ),
    }


def summarize(options: Options, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One JSON-ready report: medians of the per-step ratios to the floor (wall clock, and
    process CPU time on CPU, which other programs' load does not inflate), memory per rank,
    and whether the targets are met (on the wall clock)."""
    wall = _against_floor(ranks, options.dim, "wall")
    cpu = _against_floor(ranks, options.dim, "cpu") if ranks[0]["device"] == "cpu" else None
    budget = [MEMORY_FACTOR * r["state_mb"] + MEMORY_SLACK_MB for r in ranks]
    growth = [r["memory_growth_mb"] for r in ranks]
    target = None
    if options.kind == "partial_fc":
        target = SPEED_TARGETS["model_parallel" if options.sample_rate >= 1 else "partial_fc"]
    ratio = wall["step_over_floor_median"]
    return {
        "benchmark": "head",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {ranks[0]['device']}",
        **asdict(options),
        "threads_per_rank": ranks[0]["threads"],
        "global_batch": options.batch * options.world,
        "classes_computed_per_rank": max(r["classes_computed"] for r in ranks),
        **wall,
        "cpu_time": cpu,
        "step_over_floor_target": target,
        "speed_ok": None if target is None else ratio <= target,
        "memory_growth_mb": growth,
        "centers_and_state_mb": [r["state_mb"] for r in ranks],
        "memory_budget_mb": budget,
        "memory_ok": all(g <= b for g, b in zip(growth, budget, strict=True)),
    }


def compare_losses(losses: tuple[str, ...], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The first loss's report with its name; with more losses, each one's report and its
    median step time over the first's (wall clock, and process CPU time on CPU)."""
    first = {**reports[0], "loss": losses[0]}
    if len(losses) == 1:
        return first

    def ratio(report: dict[str, Any], clock: str) -> float | None:
        mine = report if clock == "wall" else report["cpu_time"]
        base = reports[0] if clock == "wall" else reports[0]["cpu_time"]
        return None if mine is None else mine["step_s_median"] / base["step_s_median"]

    return {
        **first,
        "by_loss": {
            name: {
                **report,
                "step_over_first_loss": ratio(report, "wall"),
                "cpu_step_over_first_loss": ratio(report, "cpu"),
            }
            for name, report in zip(losses, reports, strict=True)
        },
    }
