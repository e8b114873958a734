"""`facescale bench`: speed benchmarks, one module each in facescale.benchmarking.

Each benchmark module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and prints its figures as one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: tuple[str, ...] = ("backbone", "data", "tarfar", "head")

HELP = "measure speed and memory (" + ", ".join(BENCHMARKS) + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"facescale.benchmarking.{name}")
        bench = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(bench)
        bench.set_defaults(run_benchmark=module.run)


def run(args: argparse.Namespace) -> int:
    return args.run_benchmark(args)
