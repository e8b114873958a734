"""`--help` of every command, subcommand and benchmark describes each option and shows each
default that says something."""

from __future__ import annotations

import argparse

import pytest

from facescale.cli import build_parser


def all_parsers(parser: argparse.ArgumentParser, name: str = "facescale"):
    """``(command line, parser)`` for the parser and every subparser below it, at any depth."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


PARSERS = dict(all_parsers(build_parser()))
SELF_EXPLAINED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, SELF_EXPLAINED)]


def test_every_benchmark_and_conversion_is_walked():
    names = set(PARSERS)
    assert {"facescale bench train", "facescale bench head", "facescale bench data"} <= names
    assert {"facescale convert folder2rec", "facescale eval ijb", "facescale export onnx"} <= names


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_argument_has_help_and_shows_its_default(command):
    parser = PARSERS[command]
    text = " ".join(parser.format_help().split())
    for action in arguments(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"`{command}` {name} has no help"
        unset = action.nargs == 0 or action.default is None or action.default == []
        if not unset and "default" not in action.help.lower():
            shown = f"(default: {action.default})"
            assert shown in text, f"`{command}` {name}: the help does not show {shown}"
    # A flag, or an option without a value, has no default worth a word.
    assert "(default: None)" not in text and "(default: False)" not in text
