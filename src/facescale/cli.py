"""The `facescale` command: one entry point, one module per subcommand in facescale.commands.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from facescale import __version__
from facescale.config import ConfigError

COMMANDS = ("config", "train", "info", "bench", "convert", "eval", "export", "embed", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facescale",
        description="Train and use ArcFace-family face-recognition models at scale.",
    )
    parser.add_argument("--version", action="version", version=f"facescale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"facescale.commands.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("facescale").setLevel(logging.INFO)  # our progress; others' warnings only
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"facescale {args.command}: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
