"""`facescale info`: parameters, fp32 size and multiply-adds of backbones for a 112x112 face."""

from __future__ import annotations

import argparse
import json

HELP = "print parameters, fp32 MiB and GMACs (multiply-adds, 112x112 input) of a backbone"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="backbone name, e.g. r50; omit to list all")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding width")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from facescale.backbones import list_models, model_info

    names = [args.model] if args.model else list_models()
    infos = [model_info(name, args.embedding_size) for name in names]
    if args.json:
        rows = [info.to_dict() for info in infos]
        print(json.dumps(rows[0] if args.model else {"models": rows}))
        return 0
    print(f"{'model':<10} {'parameters':>14} {'fp32 MiB':>10} {'GMACs':>8}")
    for info in infos:
        print(f"{info.name:<10} {info.parameters:>14,} {info.fp32_mib:>10.1f} {info.gmacs:>8.2f}")
    print("GMACs: multiply-adds of convolutions and matrix products for one 112x112 image")
    return 0
