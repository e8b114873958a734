"""`facescale bench`: speed benchmarks, one module each in facescale.benchmarking.

Each benchmark module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and prints its figures as one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse

from facescale.cli_args import add_module_commands

BENCHMARKS: tuple[str, ...] = ("backbone", "data", "tarfar", "head", "train", "gpu")

HELP = "measure speed and memory (" + ", ".join(BENCHMARKS) + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_module_commands(parser, "benchmark", "facescale.benchmarking", BENCHMARKS)


def run(args: argparse.Namespace) -> int:
    return args.benchmark_run(args)
