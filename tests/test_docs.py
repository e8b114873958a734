"""Every facescale command shown in the README, docs/ and benchmarks/RESULTS.md parses with the
real command line, with config keys that exist, and the documented checks of recorded
benchmark runs pass, so the documentation cannot drift from the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from facescale.cli import build_parser
from facescale.config import FIELDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/RESULTS.md"]
# `python benchmarks/bench_NAME.py ARGS` is `facescale bench NAME ARGS`
BENCH_SCRIPT = re.compile(r"python benchmarks/bench_(\w+)\.py")


def documented_commands(page: Path) -> list[tuple[str, bool]]:
    """facescale invocations in a page: ``(command, complete)``; commands in code blocks are
    complete (continuation lines joined), inline mentions may name a subcommand alone."""
    text = page.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    lines = [(line, True) for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += [(code, False) for code in re.findall(r"`([^`\n]*facescale [^`\n]*)`", text)]
    commands = []
    for line, complete in lines:
        line = BENCH_SCRIPT.sub(r"facescale bench \1", line)
        match = re.search(r"(?:^|&& |-m )facescale (.*)", line.split("#")[0].strip())
        if match and "pip install" not in match.group(1):
            commands.append((match.group(1), complete))
    return commands


def as_argv(command: str) -> list[str]:
    """Arguments of a documented command, with synopsis brackets and ellipses dropped."""
    command = re.sub(r"\[[^\[\]]*\]", "", command)
    command = re.split(r"\s(?:\d?>|\|)", command)[0]  # a shell redirection or pipe ends it
    return [arg for arg in shlex.split(command) if arg != "..."]


CASES = [(page, *found) for page in PAGES for found in documented_commands(page)]


def test_the_docs_show_commands():
    assert len(CASES) >= 20
    shown = {as_argv(cmd)[0] for _, cmd, _ in CASES}
    assert {"train", "demo", "config", "convert", "eval", "export"} <= shown


@pytest.mark.parametrize(
    ("page", "command", "complete"), CASES, ids=[f"{p.name}:{c[:40]}" for p, c, _ in CASES]
)
def test_documented_command_parses(page, command, complete):
    argv = as_argv(command)
    try:
        args = build_parser().parse_args(argv if complete else [*argv, "--help"])
    except SystemExit as exit_:
        if not complete and exit_.code == 0:
            return  # a subcommand named in the text exists
        pytest.fail(f"{page.name}: `facescale {command}` does not parse (exit {exit_.code})")
    for item in getattr(args, "overrides", []):
        key = item.partition("=")[0]
        assert key in FIELDS, f"{page.name}: `facescale {command}` sets unknown key {key!r}"


def test_the_documented_planner_checks_pass_on_the_recorded_runs():
    """`plan_vs_measured.py` as benchmarks/RESULTS.md runs it: the fit, and the check that
    fails when a prediction is off by more than 15%."""
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    runs = re.findall(r"python benchmarks/plan_vs_measured\.py ([^`\n]*\.json)", text)
    assert any(r.startswith("--fit ") for r in runs) and any("cpu_" in r for r in runs)
    for arguments in runs:
        files = [str(p) for arg in arguments.split() if arg != "--fit" for p in ROOT.glob(arg)]
        assert files, arguments
        flags = ["--fit"] if arguments.startswith("--fit") else []
        done = subprocess.run(
            [sys.executable, "benchmarks/plan_vs_measured.py", *flags, *files],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
