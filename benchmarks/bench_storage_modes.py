"""One rank's lean head step in each center storage mode, alternated in one process.

Every round steps each mode's head once (forward, backward, update) on the same batch and
times it in process CPU time, one thread; the report is each mode's median against the
first mode's. A rank's share of `facescale bench head --world 2 --classes 1000000 --batch
128`, without the collectives, so the modes meet the same machine load. A mode ending in
``+torch`` stores its narrow tables with torch operations instead of the one-pass C kernel
(heads/native.py), as a machine without a C compiler does:

    python benchmarks/bench_storage_modes.py --classes 500000 --batch 256 --rate 0.1
    python benchmarks/bench_storage_modes.py --rate 1.0 --rounds 3 --modes fp32/fp32,bf16/bf16
    python benchmarks/bench_storage_modes.py --modes fp32/fp32,bf16/int8,bf16/int8+torch
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from facescale.heads import ArcFace, native
from facescale.heads.partial_fc import LeanPartialFC


def step(
    head: LeanPartialFC, embeddings: torch.Tensor, labels: torch.Tensor, torch_store: bool
) -> float:
    """Process CPU seconds of one training step of ``head``; with ``torch_store`` its narrow
    tables are stored by torch operations."""
    kernels = native.narrow_store
    if torch_store:
        native.narrow_store = lambda: None
    try:
        start = time.process_time()
        head(embeddings.clone().requires_grad_(), labels).backward()
        head.step()
        return time.process_time() - start
    finally:
        native.narrow_store = kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=500_000, help="classes of the shard")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1, help="Partial FC sample rate")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per mode")
    parser.add_argument(
        "--modes",
        default="fp32/fp32,bf16/bf16,bf16/int8,fp16/int8",
        help="center_dtype/center_state_dtype pairs (+torch: torch stores); the first: reference",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
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
