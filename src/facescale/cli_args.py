"""Argparse pieces shared by the `facescale` commands and the benchmarks: subcommands loaded
from modules, and the repeatable ``--set KEY=VALUE`` config override."""

from __future__ import annotations

import argparse
import importlib


def add_module_commands(
    parser: argparse.ArgumentParser, dest: str, package: str, names: tuple[str, ...]
) -> None:
    """One subcommand per module ``package.NAME``; each module defines ``HELP``,
    ``add_arguments(parser)`` and ``run(args) -> int``, stored as ``args.<dest>_run``."""
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
    for name in names:
        module = importlib.import_module(f"{package}.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(**{f"{dest}_run": module.run})


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE [KEY=VALUE ...]`` (repeatable) into one list, ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"{help}; one --set may take several pairs",
    )
