"""The memory planner (`facescale plan`) against peaks measured by `facescale bench train`.

Reads saved reports of `python benchmarks/bench_train.py ... --json > run.json`, predicts
every measured run with the current planner and prints predicted, measured and their
ratio; exits with status 1 if a prediction is off by more than 15%. With `--fit` it prints
instead the CPU overhead constants of facescale/plan.py fitted (least squares) to the runs
whose peak falls in the backbone's backward or the optimizer.

    python benchmarks/plan_vs_measured.py grid.json r18.json
    python benchmarks/plan_vs_measured.py --fit calibration/*.json
"""

import argparse
import json

import numpy as np

from facescale import plan
from facescale.benchmarking.train import parse_mode
from facescale.config import load_config

TOLERANCE = 0.15
MIB = 2**20


def measured_runs(paths):
    """(name, config, ranks, device, measured peak bytes) of every completed run."""
    for path in paths:
        with open(path) as file:
            report = json.load(file)
        for run in report["runs"]:
            if run["status"] != "ok":
                continue
            overrides = [
                f"network={report['network']}",
                f"batch_size={report['batch_per_rank']}",
                f"num_classes={run['classes']}",
                f"fp16={report['precision'] == 'fp16'}",
                f"bf16={report['precision'] == 'bf16'}",
                *parse_mode(run["mode"]).overrides(),
            ]
            name = (
                f"{report['network']} b{report['batch_per_rank']} {run['label']} {run['classes']:,}"
            )
            cfg = load_config(None, overrides)
            yield name, cfg, report["ranks"], report["device"], run["peak_mib"] * MIB


def compare(paths) -> float:
    print("| run | predicted MiB | measured MiB | predicted / measured |\n|---|---|---|---|")
    ratios = []
    for name, cfg, ranks, device, measured in measured_runs(paths):
        predicted = plan.estimate(cfg, ranks, device).peak
        ratios.append(predicted / measured)
        print(f"| {name} | {predicted / MIB:.0f} | {measured / MIB:.0f} | {ratios[-1]:.3f} |")
    return max(abs(r - 1) for r in ratios)


def fit(paths) -> None:
    """measured - live tensors = runtime + share x activations + copies x parameter bytes."""
    rows, excess = [], []
    for _, cfg, ranks, _, measured in measured_runs(paths):
        live = plan.estimate(cfg, ranks, "cuda")  # tensors only
        if live.peak_phase in plan.BACKWARD_PHASES:
            trace = plan.trace_backbone(cfg)
            rows.append([1.0, trace.activations, plan.FLOAT_BYTES * trace.parameters])
            excess.append(measured - live.peak)
    (runtime, share, copies), *_ = np.linalg.lstsq(np.array(rows), np.array(excess), rcond=None)
    print(f"CPU_RUNTIME_BYTES = {runtime / MIB:.0f} MiB")
    print(f"CPU_RETAINED_SHARE = {share:.3f}")
    print(f"CPU_RETAINED_PARAMETER_COPIES = {copies:.2f}  (from {len(rows)} runs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="JSON reports of bench_train.py --json")
    parser.add_argument("--fit", action="store_true", help="fit the CPU overhead constants")
    args = parser.parse_args()
    if args.fit:
        fit(args.reports)
    else:
        error = compare(args.reports)
        print(f"\nlargest error: {error:.1%} (tolerance {TOLERANCE:.0%})")
        raise SystemExit(0 if error <= TOLERANCE else 1)
