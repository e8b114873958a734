"""`facescale bench train`: samples/s and peak memory per rank of real training steps for
data parallel, model parallel and Partial FC heads as the number of identities grows.

Each (mode, classes) configuration runs the trainer (backbone + head + optimizer) in its
own ``torchrun --standalone`` job (:mod:`facescale.benchmarking.train_worker`), so running
out of memory ends only that job and shows as ``-`` in the table. On CPU each rank's data
segment is capped (``--memory-limit``) so an oversized configuration fails its allocation
instead of exhausting the machine. Beside each measured peak stands the memory planner's
prediction (:mod:`facescale.plan`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from facescale.cli_args import add_overrides_argument
from facescale.launch import run_with_time_limit, torchrun_command

HELP = "training samples/s and peak memory per rank: data vs model parallel vs Partial FC"

MIB = 2**20
PHASES = {
    "data": ("data",),
    "backbone": ("backbone_forward", "backbone_backward"),
    "head": ("head_forward", "head_backward"),
    "optimizer": ("optimizer",),
}
SAFETY_MARGIN = 2 * 2**30  # RAM left to everything else when the memory cap is automatic


@dataclass(frozen=True)
class Mode:
    """A way to hold the classification layer: its config keys and its name in the table."""

    name: str
    head: str
    sample_rate: float
    center_dtype: str = "fp32"
    center_state_dtype: str = "fp32"

    @property
    def label(self) -> str:
        if self.head == "data_parallel":
            return "data parallel"
        label = "model parallel" if self.sample_rate == 1 else f"Partial FC {self.sample_rate:g}"
        if (self.center_dtype, self.center_state_dtype) != ("fp32", "fp32"):
            label += f", {self.center_dtype} centers, {self.center_state_dtype} state"
        return label

    def overrides(self) -> list[str]:
        return [
            f"head={self.head}",
            f"sample_rate={self.sample_rate!r}",
            f"center_dtype={self.center_dtype}",
            f"center_state_dtype={self.center_state_dtype}",
        ]


STORAGE = {"center_dtype": ("fp32", "bf16", "fp16"), "center_state_dtype": ("fp32", "bf16", "int8")}


def parse_mode(text: str) -> Mode:
    """``data``, ``model`` or ``partial:RATE`` (Partial FC sampling RATE of each shard); the
    last two may add the storage of the centers and of their state, ``/CENTERS/STATE``
    (e.g. ``partial:0.1/bf16/int8``; fp32 by default)."""
    head, *storage = text.split("/")
    kinds = dict(zip(STORAGE, storage, strict=False))
    wrong = any(kind not in STORAGE[key] for key, kind in kinds.items())
    if len(storage) > 2 or (storage and head == "data") or wrong:
        raise argparse.ArgumentTypeError(
            f"parallel mode {text!r}: storage after 'model' or 'partial:RATE' is "
            f"/CENTERS/STATE, CENTERS one of {', '.join(STORAGE['center_dtype'])} and "
            f"STATE one of {', '.join(STORAGE['center_state_dtype'])}"
        )
    if head == "data":
        return Mode(text, "data_parallel", 1.0)
    if head == "model":
        return Mode(text, "partial_fc", 1.0, **kinds)
    kind, _, rate = head.partition(":")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if kind != "partial" or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"parallel mode {text!r}: use 'data', 'model' or 'partial:RATE' with RATE in (0, 1]"
        )
    return Mode(text, "partial_fc", value, **kinds)


def parse_count(text: str) -> int:
    """A positive count, optionally with a k or M suffix: 10k, 1.4M, 93431."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = Decimal(text[:-1] if scale > 1 else text) * scale
    except InvalidOperation:
        value = Decimal(0)
    if not value.is_finite() or value < 1 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole count > 0 such as 10k or 2M")
    return int(value)


def parse_size_arg(text: str) -> int:
    from facescale.plan import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", default="mbf", help="backbone")
    parser.add_argument(
        "--classes",
        type=parse_count,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="identity counts, e.g. 10k 100k 1M (default: 10k 100k 1M)",
    )
    parser.add_argument(
        "--parallel",
        type=parse_mode,
        nargs="+",
        default=[parse_mode(m) for m in ("data", "model", "partial:0.1")],
        help="modes: data, model, partial:RATE; the last two may add /CENTERS/STATE storage, "
        "e.g. partial:0.1/bf16/int8 (default: data model partial:0.1)",
    )
    parser.add_argument(
        "--ranks", type=int, default=0, help="processes (default: GPUs, or 2 on CPU)"
    )
    parser.add_argument("--batch", type=int, default=32, help="images per rank")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="arithmetic of the backbone (config keys fp16 / bf16)",
    )
    parser.add_argument("--rec", default="synthetic", help="'synthetic' or a record folder")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument(
        "--memory-limit",
        type=parse_size_arg,
        default=None,
        help="CPU only: memory each rank may add, e.g. 6GiB; never more than the available "
        "RAM minus 2 GiB, shared by the ranks (the default)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument(
        "--comm",
        action="store_true",
        help="profile as many steps again to measure time with collectives in flight",
    )
    add_overrides_argument(parser, "any other config key (repeatable), e.g. --set optimizer=adamw")
    parser.add_argument("--plot", type=Path, help="write a PNG of samples/s and memory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ---- one configuration -----------------------------------------------------------------
def config_overrides(args: argparse.Namespace, mode: Mode, classes: int, output: Path) -> list[str]:
    """The config of one configuration: an epoch long enough that none ends while measured."""
    steps = args.warmup + args.steps * (2 if args.comm else 1) + 1
    return [
        f"network={args.network}",
        f"num_classes={classes}",
        f"batch_size={args.batch}",
        f"num_image={steps * args.batch * args.ranks}",
        "num_epoch=1",
        "gradient_acc=1",
        f"rec={args.rec}",
        f"num_workers={args.workers}",
        f"fp16={args.precision == 'fp16'}",
        f"bf16={args.precision == 'bf16'}",
        "keep_checkpoints=0",
        "val_targets=[]",
        "frequent=1000000000",
        "verbose=1000000000",
        f"output={output}",
        *mode.overrides(),
        *args.overrides,
    ]


def launch(spec_path: Path, ranks: int, log_path: Path, timeout: float) -> str | None:
    """Run one torchrun job; None when it exits, 'timeout' when it had to be stopped."""
    command = torchrun_command(
        ranks, [str(spec_path)], module="facescale.benchmarking.train_worker"
    )
    return None if run_with_time_limit(command, log_path, timeout) else "timeout"


def summarize_ranks(ranks: list[dict[str, Any]], global_batch: int, steps: int) -> dict[str, Any]:
    """samples/s over the slowest rank's step time, peak memory, the share of each phase."""
    step_s = max(sum(r["timings"].values()) for r in ranks) / steps
    totals = {k: sum(sum(r["timings"][p] for p in ps) for r in ranks) for k, ps in PHASES.items()}
    whole = max(sum(totals.values()), 1e-12)
    summary = {
        "samples_per_s": global_batch / step_s,
        "step_s": step_s,
        "peak_mib": max(r["peak_bytes"] for r in ranks) / MIB,
        "peak_mib_per_rank": [r["peak_bytes"] / MIB for r in ranks],
        "baseline_mib": max(r["baseline_bytes"] for r in ranks) / MIB,
        "phase_share": {k: v / whole for k, v in totals.items()},
        "threads_per_rank": ranks[0]["threads"],
    }
    if "reserved_bytes" in ranks[0]:
        summary["reserved_mib"] = max(r["reserved_bytes"] for r in ranks) / MIB
    if "comm_s" in ranks[0]:
        summary["comm_share"] = max(r["comm_s"] / r["profiled_s"] for r in ranks)
    return summary


def read_outcome(folder: Path, stopped: str | None) -> dict[str, Any]:
    """The job's result, or why there is none: 'oom', 'timeout' or 'failed'."""
    result = folder / "result.json"
    if result.is_file():
        return {"status": "ok", "ranks": json.loads(result.read_text())["ranks"]}
    failures = [json.loads(path.read_text()) for path in folder.glob("failed_rank*.json")]
    if failures:  # out of memory anywhere, else the earliest error (the others follow it)
        first = min(failures, key=lambda f: (not f["oom"], f["time"]))
        status = "oom" if first["oom"] else "failed"
        return {"status": status, "error": f"rank {first['rank']}: {first['error']}"}
    log = folder / "log.txt"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    if stopped:
        return {"status": stopped, "error": f"stopped at the time limit; its output:\n{tail}"}
    return {"status": "failed", "error": tail or "the job printed nothing"}


def run_config(
    args: argparse.Namespace, mode: Mode, classes: int, device: str, root: Path
) -> dict[str, Any]:
    """Launch one configuration and return its row of the report."""
    from facescale.benchmarking.train_worker import RunSpec
    from facescale.config import load_config
    from facescale.memory import available_memory
    from facescale.plan import estimate

    folder = root / f"{mode.name.replace(':', '_').replace('/', '_')}_{classes}"
    folder.mkdir(parents=True)
    overrides = config_overrides(args, mode, classes, folder / "output")
    limit = None
    if device == "cpu":
        limit = max(1, available_memory() - SAFETY_MARGIN) // args.ranks
        limit = min(limit, args.memory_limit or limit)
    spec = RunSpec(overrides, args.warmup, args.steps, str(folder), limit, args.comm)
    spec.save(folder / "spec.json")
    gpu_memory = None
    if device == "cuda":
        import torch

        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    predicted = estimate(load_config(None, overrides), args.ranks, device, gpu_memory)
    row: dict[str, Any] = {
        "mode": mode.name,
        "label": mode.label,
        "classes": classes,
        "predicted_mib": predicted.peak / MIB,
        "memory_limit_mib": None if limit is None else limit / MIB,
    }
    stopped = launch(folder / "spec.json", args.ranks, folder / "log.txt", args.timeout)
    outcome = read_outcome(folder, stopped)
    row["status"] = outcome["status"]
    if outcome["status"] == "ok":
        row.update(summarize_ranks(outcome["ranks"], args.batch * args.ranks, args.steps))
        row["predicted_over_measured"] = row["predicted_mib"] / row["peak_mib"]
    else:
        row["error"] = outcome["error"]
    return row


# ---- the report ------------------------------------------------------------------------
def cell(row: dict[str, Any]) -> str:
    """``samples/s (peak MiB)`` as arcface_torch's table writes it; ``-`` for out of memory."""
    if row["status"] == "ok":
        return f"{row['samples_per_s']:.1f} ({row['peak_mib']:.0f})"
    return {"oom": "-", "skipped": "-"}.get(row["status"], row["status"])


def markdown_table(rows: list[dict[str, Any]], modes: list[Mode], classes: list[int]) -> str:
    """Identities down, modes across; each cell samples/s (peak MiB per rank)."""
    found = {(r["mode"], r["classes"]): r for r in rows}
    lines = [
        "| identities | " + " | ".join(m.label for m in modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for count in classes:
        cells = [cell(found[(m.name, count)]) for m in modes if (m.name, count) in found]
        lines.append(f"| {count:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_markdown(rows: list[dict[str, Any]]) -> str:
    """The planner's predicted peak per rank beside the measured one, for every run."""
    lines = [
        "| mode | identities | predicted MiB | measured MiB | predicted / measured |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"| {r['label']} | {r['classes']:,} | {r['predicted_mib']:.0f} | "
                f"{r['peak_mib']:.0f} | {r['predicted_over_measured']:.3f} |"
            )
    return "\n".join(lines)


def shares_markdown(rows: list[dict[str, Any]]) -> str:
    """Where the step time goes, per run: phases summed over ranks, as shares."""
    comm = any("comm_share" in r for r in rows)
    head = "| mode | identities | step s | " + " | ".join(PHASES)
    lines = [head + (" | collectives in flight |" if comm else " |")]
    lines.append("|---" * (3 + len(PHASES) + comm) + "|")
    for r in rows:
        if r["status"] == "ok":
            cells = [r["label"], f"{r['classes']:,}", f"{r['step_s']:.2f}"]
            cells += [f"{r['phase_share'][p]:.1%}" for p in PHASES]
            if comm:
                cells.append(f"{r['comm_share']:.1%}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], modes: list[Mode], title: str, path: Path) -> None:
    """Samples/s and peak memory per rank against identities, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in modes:
        done = [r for r in rows if r["mode"] == mode.name and r["status"] == "ok"]
        counts = [r["classes"] for r in done]
        speed.plot(counts, [r["samples_per_s"] for r in done], marker="o", label=mode.label)
        memory.plot(counts, [r["peak_mib"] / 1024 for r in done], marker="o", label=mode.label)
    for axes, label in ((speed, "samples/s"), (memory, "peak memory per rank (GiB)")):
        axes.set_xscale("log")
        axes.set_xlabel("identities")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    speed.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.ranks = args.ranks or (torch.cuda.device_count() if device == "cuda" else 2)
    if args.warmup < 1 or args.steps < 1 or args.ranks < 1 or args.batch < 1:
        raise ValueError("--warmup, --steps, --ranks and --batch must be >= 1")
    modes, classes = list(dict.fromkeys(args.parallel)), sorted(set(args.classes))
    rows = []
    with tempfile.TemporaryDirectory(prefix="facescale-bench-train-") as tmp:
        for mode in modes:
            failed_at = None
            for count in classes:
                if failed_at is not None:
                    rows.append(
                        {
                            "mode": mode.name,
                            "label": mode.label,
                            "classes": count,
                            "status": "skipped",
                            "error": f"{failed_at:,} identities already ran out of memory",
                        }
                    )
                    continue
                row = run_config(args, mode, count, device, Path(tmp))
                rows.append(row)
                if not args.json:
                    print(f"{mode.label:>16} {count:>12,}: {cell(row)}", file=sys.stderr)
                if row["status"] == "oom":
                    failed_at = count
    title = f"{args.network}, {args.ranks} ranks x batch {args.batch}, {args.precision}, {device}"
    table = markdown_table(rows, modes, classes)
    if args.plot:
        plot(rows, modes, title, args.plot)
    ratios = [r["predicted_over_measured"] for r in rows if r["status"] == "ok"]
    plan_error = max((abs(x - 1) for x in ratios), default=None)
    report = {
        "benchmark": "train",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {device}",
        "device": device,
        "network": args.network,
        "ranks": args.ranks,
        "batch_per_rank": args.batch,
        "precision": args.precision,
        "rec": args.rec,
        "warmup": args.warmup,
        "steps": args.steps,
        "runs": rows,
        "markdown": table,
        "shares_markdown": shares_markdown(rows),
        "plan_markdown": plan_markdown(rows),
        "plan_max_error": plan_error,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{title}; cells: samples/s (peak MiB per rank), '-': out of memory\n{table}")
        print(f"\nshare of step time\n{report['shares_markdown']}")
        print(f"\nmemory planner (facescale plan) vs measured\n{report['plan_markdown']}")
        failures = [r for r in rows if r["status"] in ("failed", "timeout")]
        for row in failures:
            print(f"\n{row['label']} {row['classes']:,}: {row['status']}\n{row['error']}")
    return 0
