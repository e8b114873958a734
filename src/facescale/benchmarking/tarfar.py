"""`facescale bench tarfar`: exact all-to-all TAR@FAR speed against this machine's sgemm rate.

Scores N synthetic L2-normalised features (``--per-id`` images per identity) against each
other with :func:`facescale.eval.tar_at_far_all_pairs`, timing the whole call (block
products, candidate pool, float64 rescoring, genuine pairs). Its rate counts only the
``N (N - 1) / 2`` scores it needs, ``2 D`` flops each. The reference is a float32 matrix
multiply of one score block (``[block, D] x [D, block]``), timed ``--repeats`` times just
before and just after in the same process; the ratio divides by the fastest of those (and,
for a noisy machine, also by their median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

HELP = "exact all-to-all TAR@FAR: GFLOP/s of the blockwise scan vs the float32 matmul rate"

TARGET_RATIO = 0.6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=200_000, help="features")
    parser.add_argument("--dim", type=int, default=512, help="feature size")
    parser.add_argument("--per-id", type=int, default=10, help="images per identity")
    parser.add_argument("--block", type=int, default=4096, help="rows per score block")
    parser.add_argument(
        "--far", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4], help="FARs to report TAR at"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed matmuls per sgemm figure")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def sgemm_gflops(block: int, dim: int, repeats: int) -> list[float]:
    """GFLOP/s of each of ``repeats`` float32 products of one ``block`` x ``block`` block."""
    import torch

    left, right = torch.randn(block, dim), torch.randn(block, dim)
    out = torch.empty(block, block)
    torch.mm(left, right.T, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(left, right.T, out=out)
        rates.append(2 * block * block * dim / (time.perf_counter() - start) / 1e9)
    return rates


def synthetic_features(n: int, dim: int, per_id: int, seed: int = 0) -> tuple[Any, Any]:
    """Unit features scattered around one random centre per identity, and their labels;
    built a chunk at a time so the features are the only large allocation."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // per_id
    centres = torch.randn(int(labels[-1]) + 1, dim, generator=generator)
    features = torch.empty(n, dim)
    for start in range(0, n, 1 << 14):
        rows = labels[start : start + (1 << 14)]
        noisy = centres[rows] * 0.5 + torch.randn(len(rows), dim, generator=generator)
        features[start : start + len(rows)] = torch.nn.functional.normalize(noisy, dim=1)
    return features, labels.numpy()


def run(args: argparse.Namespace) -> int:
    import torch

    from facescale.eval import tar_at_far_all_pairs
    from facescale.memory import process_memory

    if args.n < 2 or args.dim < 1 or args.per_id < 2 or args.block < 1 or args.repeats < 1:
        raise ValueError("--n >= 2, --dim >= 1, --per-id >= 2, --block >= 1, --repeats >= 1")
    features, labels = synthetic_features(args.n, args.dim, args.per_id)
    sgemm_rates = sgemm_gflops(args.block, args.dim, args.repeats)
    peak_before = process_memory("VmHWM") / 2**20
    start = time.perf_counter()
    results = tar_at_far_all_pairs(features, labels, args.far, args.block)
    elapsed = time.perf_counter() - start
    sgemm_rates += sgemm_gflops(args.block, args.dim, args.repeats)
    achieved = args.n * (args.n - 1) * args.dim / elapsed / 1e9
    sgemm = max(sgemm_rates)
    report = {
        "benchmark": "tarfar",
        "n": args.n,
        "dim": args.dim,
        "block": args.block,
        "threads": torch.get_num_threads(),
        "seconds": elapsed,
        "achieved_gflops": achieved,
        "sgemm_gflops": sgemm,
        "sgemm_gflops_median": statistics.median(sgemm_rates),
        "ratio": achieved / sgemm,
        "ratio_to_median": achieved / statistics.median(sgemm_rates),
        "target_ratio": TARGET_RATIO,
        "features_mib": features.numel() * 4 / 2**20,
        "score_matrix_mib": args.n * args.n * 4 / 2**20,
        "peak_rss_mib_before_scan": peak_before,
        "peak_rss_mib": process_memory("VmHWM") / 2**20,
        "results": [r.as_dict() for r in results],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{args.n} x {args.dim} features, all {args.n * (args.n - 1) // 2} pairs, {elapsed:.1f} s"
    )
    print(
        f"scan {achieved:.1f} GFLOP/s vs sgemm {sgemm:.1f} GFLOP/s: ratio {report['ratio']:.2f} "
        f"(target >= {TARGET_RATIO})"
    )
    print(
        f"peak RSS {peak_before:.0f} MiB before the scan, {report['peak_rss_mib']:.0f} MiB after; "
        f"features {report['features_mib']:.0f} MiB; "
        f"a full score matrix would be {report['score_matrix_mib']:.0f} MiB"
    )
    for r in results:
        print(f"TAR@FAR={r.far:g}: {100 * r.tar:.3f} % (threshold {r.threshold:.6f})")
    return 0
