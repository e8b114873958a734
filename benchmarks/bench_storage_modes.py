"""One rank's lean head step in each center storage mode, alternated in one process.

Every round steps each mode's head once (forward, backward, update) on the same batch and
times it in process CPU time, one thread; the report is each mode's median against the
first mode's. A rank's share of `facescale bench head --world 2 --classes 1000000 --batch
128`, without the collectives, so the modes meet the same machine load. A mode ending in
``+torch`` updates and stores its narrow tables with torch operations instead of the
one-pass C kernel (heads/native.py), as a machine without a C compiler does:

    python benchmarks/bench_storage_modes.py --classes 500000 --batch 256 --rate 0.1
    python benchmarks/bench_storage_modes.py --rate 1.0 --rounds 3 --modes fp32/fp32,bf16/bf16
    python benchmarks/bench_storage_modes.py --modes fp32/fp32,bf16/int8,bf16/int8+torch
    python benchmarks/bench_storage_modes.py --stores --rounds 30

``--stores`` times the store alone instead: one block of 512 rows of each narrow kind, by
the kernel and by torch, to a range of rows and to scattered rows.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from facescale.heads import ArcFace, native
from facescale.heads.partial_fc import ROUNDING_ROWS, LeanPartialFC
from facescale.heads.rows import Scratch
from facescale.heads.storage import RoundingNoise, RowTable, noise_terms


@contextlib.contextmanager
def stored_by_torch(on: bool) -> Iterator[None]:
    """Narrow tables stored by torch operations while ``on``, else by the one-pass kernel."""
    kernels = native.narrow_store
    if on:
        native.narrow_store = lambda: None
    try:
        yield
    finally:
        native.narrow_store = kernels


def step(
    head: LeanPartialFC, embeddings: torch.Tensor, labels: torch.Tensor, torch_store: bool
) -> float:
    """Process CPU seconds of one training step of ``head``; with ``torch_store`` its narrow
    tables are stored by torch operations."""
    with stored_by_torch(torch_store):
        start = time.process_time()
        head(embeddings.clone().requires_grad_(), labels).backward()
        head.step()
        return time.process_time() - start


def time_stores(dim: int, rounds: int) -> None:
    """Print the median microseconds of storing one block of each narrow kind."""
    tables = {
        "bf16": RowTable("weight", "bf16"),
        "fp16": RowTable("weight", "fp16"),
        "int8": RowTable("momentum_buffer", "int8"),
        "int8 sqrt": RowTable("exp_avg_sq", "int8", nonnegative=True),
    }
    count = ROUNDING_ROWS
    values = torch.randn(count, dim)
    terms = noise_terms(0, 1, torch.arange(count), dim)
    combined, work = torch.empty(count, dim, dtype=torch.int32), Scratch()
    scattered = torch.randperm(20 * count)[:count].sort().values
    for label, table in tables.items():
        module = torch.nn.Module()
        table.register(module, 20 * count, dim, torch.device("cpu"))
        for where, rows in (("range", slice(count, 2 * count)), ("scattered", scattered)):
            medians = []
            for torch_store in (False, True):
                seconds = []
                with stored_by_torch(torch_store):
                    for _ in range(rounds):
                        block = values.abs() if table.nonnegative else values.clone()
                        start = time.perf_counter()
                        table.write(module, rows, block, RoundingNoise(*terms, combined), work)
                        seconds.append(time.perf_counter() - start)
                medians.append(1e6 * statistics.median(seconds))
            print(f"{label:10s} {where:9s} kernel {medians[0]:5.0f} us  torch {medians[1]:5.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=500_000, help="classes of the shard")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1, help="Partial FC sample rate")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per mode")
    parser.add_argument("--stores", action="store_true", help="time the block stores alone")
    parser.add_argument(
        "--modes",
        default="fp32/fp32,bf16/bf16,bf16/int8,fp16/int8",
        help="center_dtype/center_state_dtype pairs (+torch: torch stores); the first: reference",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.stores:
        time_stores(args.dim, args.rounds)
        return
    heads = {}
    for mode in args.modes.split(","):
        centers, state = mode.removesuffix("+torch").split("/")
        head = LeanPartialFC(
            args.classes,
            args.dim,
            ArcFace(64.0, 0.5),
            args.rate,
            center_dtype=centers,
            center_state_dtype=state,
        )
        head.configure_optimizer("sgd", lr=0.1)
        heads[mode] = head
    embeddings = torch.nn.functional.normalize(torch.randn(args.batch, args.dim), dim=1)
    labels = torch.randint(0, args.classes, (args.batch,))
    for head in heads.values():
        step(head, embeddings, labels, False)  # warm-up: scratch buffers, first-touch pages
    times: dict[str, list[float]] = {mode: [] for mode in heads}
    for _ in range(args.rounds):
        for mode, head in heads.items():
            times[mode].append(step(head, embeddings, labels, mode.endswith("+torch")))
    reference = statistics.median(times[next(iter(heads))])
    for mode, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{mode:16s} {median:.3f} s  {median / reference:.3f}x")


if __name__ == "__main__":
    main()
