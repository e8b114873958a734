"""`facescale bench gpu`: the device check, one command that proves the GPU path.

Each stage runs on its own (a failing stage records its error and the others still run) and
reports ``{"pass": bool, ...figures}``; the command prints one object ``{"pass", "device",
"seconds", "stages"}``, and each stage's result to stderr as one JSON line when it ends. On
CUDA the sizes are the production ones (about 3 minutes on one H200: benchmarks/RESULTS.md);
``--device cpu`` runs every stage at tiny sizes, which the test suite does so that the check
cannot rot. The stages themselves live in :mod:`facescale.benchmarking.gpu_checks`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facescale.benchmarking import print_report

HELP = "the device check: the GPU path's correctness and speed, stage by stage (pass/fail)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facescale.benchmarking.gpu_checks import STAGES

    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="where to run (default: cuda when a GPU is visible, else cpu at tiny sizes)",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run (default: all: " + ", ".join(STAGES) + ")",
    )
    parser.add_argument(
        "--workdir", default=None, help="folder for the runs' files (default: a temporary one)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_stage(stage: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``stage(*args)`` with its time; an exception becomes a failed stage naming it."""
    started = time.perf_counter()
    try:
        result = stage(*args)
    except Exception as err:  # one stage's failure must not stop the others
        frame = traceback.extract_tb(err.__traceback__)[-1]
        result = {
            "pass": False,
            "error": f"{type(err).__name__}: {err}"[:2000],
            "at": f"{Path(frame.filename).name}:{frame.lineno}",
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    from facescale.benchmarking.gpu_checks import STAGES, sizes_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("facescale bench gpu: error: no CUDA device is visible", file=sys.stderr)
        return 2
    names = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        print(
            f"facescale bench gpu: error: unknown stage {', '.join(unknown)}; "
            f"choose from {', '.join(STAGES)}",
            file=sys.stderr,
        )
        return 2
    sizes = sizes_for(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facescale-gpu-") as scratch:
        workdir = Path(args.workdir or scratch)
        stages = {}
        for name in names:
            folder = workdir / name
            folder.mkdir(parents=True, exist_ok=True)
            stages[name] = run_stage(STAGES[name], torch.device(device), sizes, folder)
            # a line per stage as it ends: a run stopped by a time limit keeps what it found
            print(json.dumps({"stage": name, **stages[name]}), file=sys.stderr, flush=True)
    report = {
        "pass": all(stage["pass"] for stage in stages.values()),
        "device": device,
        "sizes": sizes.name,
        "seconds": round(time.perf_counter() - started, 2),
        "stages": stages,
    }
    print_report(report, args.json)
    return 0 if report["pass"] else 1
