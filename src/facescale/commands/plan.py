"""`facescale plan`: predicted peak memory per rank of a training config, and what fits."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from facescale.commands.config import add_config_arguments
from facescale.errors import InputError

# (center_dtype, center_state_dtype) pairs whose identity counts the plan compares
STORAGE_MODES = (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "int8"))

HELP = "predict peak memory per rank of a config; the most identities, batch, sample rate that fit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--devices", type=int, default=1, help="ranks (GPUs or CPU processes)")
    parser.add_argument(
        "--device-memory",
        help="memory of one device, e.g. 80GiB or 24GB (default: this machine's GPU, or on "
        "CPU its available RAM shared by the ranks)",
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="what the ranks run on"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _device_memory(args: argparse.Namespace) -> int:
    import torch

    from facescale.memory import available_memory
    from facescale.plan import parse_size

    if args.device_memory:
        return parse_size(args.device_memory)
    if args.device == "cpu":
        return available_memory() // args.devices
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    raise InputError("no GPU here to read its memory from; give --device-memory, e.g. 80GiB")


def answers(cfg: Any, devices: int, device: str, memory: int) -> dict[str, Any]:
    """The prediction and the answers to the planning questions, JSON-ready."""
    from facescale import plan
    from facescale.precision import resolve_bf16

    found = plan.estimate(cfg, devices, device, memory)
    rate = None
    if cfg.head == "partial_fc" or not found.required <= memory:
        rate = plan.largest_sample_rate(cfg, devices, device, memory)
    by_storage = {}
    if cfg.head == "partial_fc":
        for centers, state in STORAGE_MODES:
            narrow = dataclasses.replace(cfg, center_dtype=centers, center_state_dtype=state)
            found_count = plan.largest_num_classes(narrow, devices, device, memory)
            by_storage[f"{centers}/{state}"] = found_count
    return {
        "config": {
            k: getattr(cfg, k)
            for k in (
                "network",
                "num_classes",
                "batch_size",
                "head",
                "sample_rate",
                "optimizer",
                "center_dtype",
                "center_state_dtype",
            )
        }
        | {
            "precision": "fp16"
            if cfg.fp16
            else "bf16"
            if resolve_bf16(cfg.fp16, cfg.bf16, device)
            else "fp32"
        },
        "devices": devices,
        "device": device,
        "device_memory": memory,
        "estimate": found.to_dict(),
        "fits": found.required <= memory,
        "largest_num_classes": plan.largest_num_classes(cfg, devices, device, memory),
        "largest_batch_size": plan.largest_batch_size(cfg, devices, device, memory),
        "largest_partial_fc_sample_rate": rate,
        "largest_num_classes_by_storage": by_storage,
    }


def _describe(report: dict[str, Any]) -> str:
    from facescale.plan import format_size

    est, cfg = report["estimate"], report["config"]
    lines = [
        f"{cfg['network']}, {cfg['num_classes']:,} identities, batch {cfg['batch_size']} per "
        f"rank, {cfg['precision']}, head {cfg['head']} (sample_rate {cfg['sample_rate']}), "
        f"{report['devices']} x {report['device']} of {format_size(report['device_memory'])}",
        f"  backbone state    {format_size(est['backbone_state'])}",
        f"  head state        {format_size(est['head_state'])}  (this rank's centers in "
        f"{cfg['center_dtype']} + {cfg['optimizer']} state in {cfg['center_state_dtype']})",
        f"  step transient    {format_size(est['step_transient'])}  (largest phase: "
        f"{est['peak_phase']})",
        f"  runtime           {format_size(est['runtime'])}",
        f"  peak growth       {format_size(est['peak'])}",
        f"  + process         {format_size(est['process'])}",
        f"  required          {format_size(est['required'])}",
        f"fits: {'yes' if report['fits'] else 'no'}",
    ]
    largest = report["largest_num_classes"]
    lines.append(f"most identities that fit: {largest:,}" if largest else "no identity count fits")
    for storage, count in report["largest_num_classes_by_storage"].items():
        centers, state = storage.split("/")
        fitting = f"{count:,}" if count else "none"
        lines.append(f"  with {centers} centers and {state} optimizer state: {fitting}")
    batch = report["largest_batch_size"]
    lines.append(f"largest batch per rank that fits: {batch}" if batch else "no batch size fits")
    rate = report["largest_partial_fc_sample_rate"]
    if rate is not None:
        lines.append(f"largest Partial FC sample_rate that fits: {rate:g}")
    elif cfg["head"] == "partial_fc" or not report["fits"]:
        remedy = f"add devices or lower batch_size to {batch}" if batch else "add devices"
        lines.append(
            "no Partial FC sample_rate fits: every rank keeps its whole shard of centers and "
            f"their optimizer state (sampling saves compute, not memory); {remedy}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from facescale.config import load_config

    if args.devices < 1:
        raise InputError("--devices must be >= 1")
    cfg = load_config(args.config, args.overrides)
    memory = _device_memory(args)
    report = answers(cfg, args.devices, args.device, memory)
    print(json.dumps(report) if args.json else _describe(report))
    return 0
