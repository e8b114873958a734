"""`facescale config`: resolve a config file with overrides and print it."""

from __future__ import annotations

import argparse
import json

from facescale.cli_args import add_overrides_argument
from facescale.errors import require_writable_folder

HELP = "resolve a config (file + --set overrides), print it and the derived schedule"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config path and ``--set`` overrides, shared by every command that takes a config."""
    parser.add_argument(
        "config",
        nargs="?",
        help="arcface_torch-style config file, with or without .py, or a shipped config's name",
    )
    add_overrides_argument(parser, "override one config key (repeatable), e.g. --set lr=0.05")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=1, help="ranks to derive steps for")
    parser.add_argument("--save", action="store_true", help="write config.json into `output`")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from facescale.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.save:
        require_writable_folder(cfg.output)
    schedule = cfg.schedule(args.world_size)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "schedule": vars(schedule)}))
    else:
        print(cfg)
        print("-- derived --")
        for key, value in vars(schedule).items():
            print(f"{key} : {value}")
    if args.save:
        print(f"saved {cfg.save(cfg.output)}")
    return 0
