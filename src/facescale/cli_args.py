"""Argparse pieces shared by the `facescale` commands and the benchmarks: the parser whose help
shows every default, subcommands loaded from modules, and the repeatable ``--set KEY=VALUE``
config override."""

from __future__ import annotations

import argparse
import importlib
from typing import Any


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with ``(default: X)`` wherever a default says something: not for flags,
    nor for no value at all, nor where the help already describes its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default == []
        if action.nargs == 0 or unset or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``DefaultsHelpFormatter``; the parsers of its subcommands,
    at any depth, are made of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


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
