"""`facescale train`: one process, or every rank under torchrun."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from facescale.commands.config import add_config_arguments

HELP = "train a model (run under torchrun for several ranks or nodes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    from facescale.config import load_config
    from facescale.distributed import init_distributed, shutdown
    from facescale.train.trainer import train

    env = init_distributed()
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        if env.is_main:  # with --json, stdout holds the summary alone
            print(cfg, file=sys.stderr if args.json else sys.stdout, flush=True)
        summary = train(cfg, env)
    finally:
        shutdown()
    if env.is_main and args.json:
        print(json.dumps(summary))
    return 0
