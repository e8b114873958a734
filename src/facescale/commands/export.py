"""`facescale export onnx`: a trained backbone as ONNX, checked against PyTorch."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from facescale.errors import require_writable_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

HELP = "export a trained backbone (ONNX, dynamic batch, optional fp16) and check it"

# Largest relative difference allowed between onnxruntime and PyTorch embeddings.
TOLERANCE = {False: 1e-4, True: 5e-3}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and --network/--embedding-size/--device, shared by every command that loads one."""
    parser.add_argument("model", metavar="MODEL", help="model.pt / backbone.pth / common.pt")
    parser.add_argument("--network", required=True, help="backbone name, e.g. r50, mbf, vit_t")
    parser.add_argument(
        "--embedding-size", type=int, default=512, help="width of the embedding the weights produce"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def load_model(args: argparse.Namespace) -> tuple[nn.Module, torch.device]:
    """The backbone named by ``add_model_arguments``'s options, on its device, in eval mode."""
    import torch

    from facescale.export import load_backbone

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return load_backbone(args.network, args.model, args.embedding_size).to(device), device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = sub.add_parser("onnx", help="ONNX graph: input [batch, 3, 112, 112] -> embedding")
    add_model_arguments(onnx)
    onnx.add_argument("output", metavar="OUT.onnx", help="file to write")
    onnx.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset")
    onnx.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from facescale.export import compare_onnx, export_onnx
    from facescale.extras import require

    require("onnx")
    require_writable_folder(Path(args.output).parent)
    model, _ = load_model(args)
    path = export_onnx(model, args.output, fp16=args.fp16, opset=args.opset)
    error = compare_onnx(model, path, batch=3)
    report = {
        "path": str(path),
        "network": args.network,
        "fp16": args.fp16,
        "bytes": Path(path).stat().st_size,
        "checked_batch": 3,
        "max_relative_error": error,
        "tolerance": TOLERANCE[args.fp16],
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"wrote {path} ({report['bytes'] / 2**20:.1f} MiB); onnxruntime vs PyTorch on a "
            f"batch of 3: max relative difference {error:.2e} (allowed {report['tolerance']:.0e})"
        )
    if error > TOLERANCE[args.fp16]:
        print(f"facescale export: {path} does not reproduce the PyTorch model", file=sys.stderr)
        return 1
    return 0
