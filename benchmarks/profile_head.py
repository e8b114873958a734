"""Where a lean head step's time goes: torch's profiler over a few steps, one table per case.

    python benchmarks/profile_head.py --classes 1000000 --batch 1024 --rates 1,0.1

Each case prints torch's operators by the time of the kernels they launch (without a GPU,
by their own CPU time), the wall time per step and, on a GPU, the kernels launched and the
device's busy time per step (busy for much less than the wall time: the device waits on the
host's launches, Python or synchronisations) and where a step first waits for the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from facescale.heads import ArcFace, LeanPartialFC
from facescale.heads.partial_fc import chunk_size_for


def profile_case(args: argparse.Namespace, rate: float, storage: tuple[str, str]) -> dict:
    device = torch.device(args.device)
    head = LeanPartialFC(
        args.classes,
        args.dim,
        ArcFace(),
        rate,
        chunk_size=chunk_size_for(device, args.batch, args.dim),
        logits_dtype=args.dtype,
        cache_bytes=args.cache_mib * 2**20,
        center_dtype=storage[0],
        center_state_dtype=storage[1],
        seed=0,
        device=device,
    ).to(device)
    head.configure_optimizer("sgd", 0.1, 0.9, 5e-4)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        x = torch.randn(args.batch, args.dim, device=device, generator=generator)
        labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=generator)
        head(x.requires_grad_(), labels, sizes=[args.batch]).backward()
        head.step()

    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        step()
    wait()
    syncs = None
    if device.type == "cuda":  # the first host synchronisation of a step, where it is made
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError:
            frames = traceback.extract_tb(sys.exc_info()[2])
            syncs = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in frames[-6:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        wait()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        wait()
        wall = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    # operators (named as torch names them) by the time of the kernels they launch; the
    # kernels themselves give the device's busy time and count
    operators = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    rows = sorted(operators, key=lambda e: getattr(e, key), reverse=True)
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 / args.steps
    top = [
        {
            "name": e.key[:90],
            "ms_per_step": round(getattr(e, key) / 1e3 / args.steps, 3),
            "calls_per_step": e.count // args.steps,
        }
        for e in rows[: args.top]
    ]
    return {
        "rate": rate,
        "storage": "/".join(storage),
        "chunk_size": head.softmax.chunk_size,
        "wall_ms_per_step": round(wall * 1e3, 2),
        "device_busy_ms_per_step": round(busy * 1e3, 2) if on_device else None,
        "kernels_per_step": sum(e.count for e in kernels) // args.steps,
        "first_host_sync": syncs,
        "top": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rates", default="1,0.1")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--storage", default="fp32/fp32", help="comma-separated CENTER/STATE")
    parser.add_argument("--cache-mib", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for rate in map(float, args.rates.split(",")):
        for storage in args.storage.split(","):
            case = profile_case(args, rate, tuple(storage.split("/")))
            print(json.dumps(case), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
