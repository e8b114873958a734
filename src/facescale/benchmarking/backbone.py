"""`facescale bench backbone`: training-step speed and peak memory of a backbone per option.

Variants: plain fp32, channels-last, gradient checkpointing, bf16 autocast, and bf16 in the
channels-last layout. Each runs in
a fresh process. Its peak memory is the kernel's resident-set high-water mark (Linux
``VmHWM``, reset once the model and the batch exist) minus the resident size at that
moment: activations, gradients and workspace of the steps. Each variant also counts the
multiply-adds of one training step with torch's FLOP counter (see
:mod:`facescale.backbones.info`): unlike time, that figure is
free of noise and shows the recomputation that checkpointing adds. Ratios against fp32
come from one invocation.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

HELP = (
    "training samples/s and peak memory of a backbone: fp32, channels_last, checkpointing, "
    "bf16 (also with channels_last), compile"
)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "checkpointing": {"gradient_checkpointing": True},
    "bf16": {"bf16": True},
    "bf16_channels_last": {"bf16": True, "channels_last": True},  # a CPU's fastest, often
    "compile": {"compile": True},  # torch.compile, as the config key `compile` does
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="r50", help="backbone name")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument(
        "--variants",
        default=", ".join(v for v in VARIANTS if v != "compile"),  # spaces: the help can wrap
        help=f"comma-separated subset of {', '.join(VARIANTS)} (fp32 is always run; compile "
        "only when named, as compiling takes a while)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _return_freed_memory() -> None:
    """Serve every allocation over 64 KiB by mmap, so freeing a tensor shrinks the resident
    size at once (glibc would otherwise keep freed blocks and hide what is really live)."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def measure(model_name: str, batch: int, steps: int, options: dict[str, bool]) -> dict[str, float]:
    """Time ``steps`` forward+backward steps after a warm-up, then count one step's
    multiply-adds; runs in its own process."""
    _return_freed_memory()
    import torch

    from facescale.backbones import get_model
    from facescale.backbones.info import flop_counter
    from facescale.face import FACE_SIZE
    from facescale.memory import process_memory, reset_peak_memory
    from facescale.seeding import seed_everything

    def train_step() -> None:
        model.zero_grad(set_to_none=False)
        forward(images).square().mean().backward()

    seed_everything(0)
    settings = {"gradient_checkpointing": False, **options}
    compiled = settings.pop("compile", False)
    model = get_model(model_name, **settings).train()
    forward = torch.compile(model) if compiled else model
    images = torch.rand(batch, 3, FACE_SIZE, FACE_SIZE) * 2 - 1
    reset_peak_memory()
    before = process_memory("VmRSS")
    train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    elapsed = time.perf_counter() - start
    peak = (process_memory("VmHWM") - before) / 2**20
    forward = model  # count the model's own operations, not the compiled graph's
    with flop_counter() as counter:
        train_step()
    return {
        "samples_per_s": batch * steps / elapsed,
        "step_s": elapsed / steps,
        "peak_mib": peak,
        "train_gmacs_per_sample": counter.get_total_flops() / 2 / batch / 1e9,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from facescale.backbones.registry import model_spec

    model_spec(args.model)  # unknown name: an InputError listing the valid ones
    named = [v.strip() for v in args.variants.split(",")]
    chosen = ["fp32", *(v for v in named if v and v != "fp32")]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or args.batch < 2 or args.steps < 1:
        raise ValueError(
            f"--variants must name {', '.join(VARIANTS)} (got {', '.join(unknown) or 'ok'}); "
            f"--batch >= 2 (BatchNorm) and --steps >= 1 (got {args.batch}, {args.steps})"
        )
    results: dict[str, dict[str, float]] = {}
    for variant in chosen:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            job = pool.submit(measure, args.model, args.batch, args.steps, VARIANTS[variant])
            results[variant] = job.result()
    base = results["fp32"]
    report: dict[str, Any] = {
        "benchmark": "backbone",
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "variants": results,
        "vs_fp32": {
            name: {
                "speed": r["samples_per_s"] / base["samples_per_s"],
                "memory": r["peak_mib"] / base["peak_mib"],
                "compute": r["train_gmacs_per_sample"] / base["train_gmacs_per_sample"],
            }
            for name, r in results.items()
        },
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model}, batch {args.batch}, {args.steps} timed training steps")
    print(f"{'variant':<14} {'samples/s':>10} {'peak MiB':>9} {'GMACs/img':>10}  vs fp32:", end="")
    print(f" {'speed':>6} {'memory':>7} {'compute':>8}")
    for name, r in results.items():
        ratio = report["vs_fp32"][name]
        print(
            f"{name:<14} {r['samples_per_s']:>10.2f} {r['peak_mib']:>9.0f} "
            f"{r['train_gmacs_per_sample']:>10.2f} {'':9}{ratio['speed']:>5.2f}x "
            f"{ratio['memory']:>6.2f}x {ratio['compute']:>7.2f}x"
        )
    return 0
