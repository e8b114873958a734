"""The `facescale` command: one entry point, one module per subcommand in facescale.commands.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from facescale import __version__
from facescale.cli_args import CommandParser, add_module_commands
from facescale.errors import USER_ERRORS
from facescale.failures import first_to_print, tell_torchrun

COMMANDS = (
    "config",
    "train",
    "info",
    "bench",
    "convert",
    "eval",
    "export",
    "embed",
    "demo",
    "plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="facescale",
        description="Train and use ArcFace-family face-recognition models at scale.",
    )
    parser.add_argument("--version", action="version", version=f"facescale {__version__}")
    add_module_commands(parser, "command", "facescale.commands", COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("facescale").setLevel(logging.INFO)  # our progress; others' warnings only
    args = build_parser().parse_args(argv)
    try:
        code = args.command_run(args)
    except USER_ERRORS as err:
        line = f"facescale {args.command}: error: {err}"
        if first_to_print(line):  # the ranks of a job that fail alike print it once
            print(line, file=sys.stderr)
        tell_torchrun(line)
        code = 2
    except Exception as err:
        tell_torchrun(f"{type(err).__name__}: {err} (traceback above)")
        raise
    sys.exit(code or 0)
