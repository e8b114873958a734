"""`facescale demo`: a complete small job on built-in synthetic data, no download, CPU is enough."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from facescale.cli_args import add_overrides_argument

HELP = (
    "generate synthetic faces, train on 2 ranks, verify on unseen identities, export ONNX "
    "(with the onnx extra)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="work_dirs/demo", help="folder for every output")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (torchrun)")
    parser.add_argument("--identities", type=int, default=300, help="training identities")
    parser.add_argument(
        "--images-per-identity", type=int, default=12, help="training images of each identity"
    )
    add_overrides_argument(
        parser, "override a key of the demo's training config (`facescale config demo` shows it)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON alone (progress to stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from facescale.demo.pipeline import format_summary, run_demo

    progress = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON alone
    with contextlib.redirect_stdout(progress):
        summary = run_demo(
            Path(args.output),
            args.ranks,
            args.identities,
            args.images_per_identity,
            args.overrides,
            training_stdout=progress if args.json else None,
        )
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0
