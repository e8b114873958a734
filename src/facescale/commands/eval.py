"""`facescale eval`: verification .bin sets, IJB-B/C templates, million-scale TAR@FAR."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from facescale.commands.export import add_model_arguments, load_model
from facescale.errors import InputError

if TYPE_CHECKING:
    import numpy as np

HELP = (
    "evaluate a model: verification sets (.bin or pairs files), IJB-B/C, or TAR@FAR of saved "
    "features"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)

    verification = sub.add_parser(
        "verification", help="10-fold accuracy on InsightFace .bin sets or pairs files"
    )
    add_model_arguments(verification)
    verification.add_argument(
        "sets",
        nargs="+",
        metavar="SET",
        help="lfw.bin, cfp_fp.bin, ..., or pairs files: lines `PATH_A PATH_B SAME(1/0)`, paths "
        "relative to the file's folder, images fitted as `facescale embed` fits them",
    )
    verification.add_argument(
        "--align",
        action="store_true",
        help="align the face crops of pairs files by their found landmarks (the 'align' extra)",
    )
    verification.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    verification.add_argument(
        "--folds", type=int, default=10, help="cross-validation folds of the pairs"
    )
    verification.set_defaults(evaluate=_verification)

    ijb = sub.add_parser("ijb", help="IJB-B/C 1:1 TAR at FAR 1e-6 ... 1e-1 and a ROC plot")
    add_model_arguments(ijb)
    ijb.add_argument("root", help="dataset folder holding meta/ and loose_crop/ (e.g. .../IJBC)")
    ijb.add_argument(
        "--target", choices=("IJBB", "IJBC"), default="IJBC", help="which benchmark ROOT holds"
    )
    ijb.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    ijb.add_argument("--workers", type=int, default=4, help="image loading processes")
    ijb.add_argument(
        "--no-detector-score", action="store_true", help="do not weight images by detector score"
    )
    ijb.add_argument("--roc", metavar="PNG", help="write the ROC curve to this file")
    ijb.set_defaults(evaluate=_ijb)

    tarfar = sub.add_parser("tarfar", help="exact TAR@FAR of saved features (MFR style)")
    tarfar.add_argument("features", help=".npy [N, D] features (L2-normalised here)")
    tarfar.add_argument("labels", help=".npy [N] integer identity labels")
    tarfar.add_argument(
        "--gallery",
        nargs=2,
        metavar=("FEATURES", "LABELS"),
        help="score features/labels (the probes) against this gallery instead of all-to-all",
    )
    tarfar.add_argument(
        "--far", type=float, nargs="+", help="FARs (default 1e-6 all-to-all, 1e-4 with --gallery)"
    )
    tarfar.add_argument("--block", type=int, default=4096, help="rows per score block")
    tarfar.set_defaults(evaluate=_tarfar)

    for protocol in (verification, ijb, tarfar):
        protocol.add_argument("--json", action="store_true", help="print one JSON object")


def _verification(args: argparse.Namespace) -> dict:
    from facescale.eval import evaluate_verification, load_verification_set

    model, device = load_model(args)
    results = {}
    for path in args.sets:
        vset = load_verification_set(path, args.align)
        result = evaluate_verification(model, vset, args.batch_size, device, args.folds)
        results[vset.name] = result.as_dict()
        if not args.json:
            print(result.summary())
    return {"verification": results}


def _ijb(args: argparse.Namespace) -> dict:
    from facescale.eval import evaluate_ijb, save_roc_plot

    model, device = load_model(args)
    result = evaluate_ijb(
        model,
        args.root,
        args.target,
        args.batch_size,
        device,
        detector_score=not args.no_detector_score,
        num_workers=args.workers,
    )
    report = {"ijb": result.as_dict()}
    if args.roc:
        curve = {f"{args.network} {args.target}": (result.roc_far, result.roc_tar)}
        report["roc"] = str(save_roc_plot(curve, args.roc))
    if not args.json:
        print(result.format_table())
        if args.roc:
            print(f"ROC curve: {report['roc']}")
    return report


def _load_npy(path: str, what: str) -> np.ndarray:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise InputError(f"{path}: cannot read {what} as a plain .npy array ({err})") from None


def _tarfar(args: argparse.Namespace) -> dict | None:
    """All-to-all or probe-gallery TAR@FAR; under torchrun every rank scans, rank 0 reports."""
    from facescale.distributed import init_distributed, shutdown
    from facescale.eval import l2_normalize, tar_at_far_all_pairs, tar_at_far_probe_gallery

    features = l2_normalize(_load_npy(args.features, "features"))
    labels = _load_npy(args.labels, "labels")
    env = init_distributed()
    try:
        if args.gallery:
            gallery = l2_normalize(_load_npy(args.gallery[0], "gallery features"))
            gallery_labels = _load_npy(args.gallery[1], "gallery labels")
            fars = args.far or [1e-4]
            results = tar_at_far_probe_gallery(
                features, labels, gallery, gallery_labels, fars, args.block, env.device
            )
        else:
            fars = args.far or [1e-6]
            results = tar_at_far_all_pairs(features, labels, fars, args.block, env.device)
    finally:
        shutdown()
    if not env.is_main:
        return None
    if not args.json:
        for r in results:
            print(
                f"TAR@FAR={r.far:g}: {100 * r.tar:.3f} % ({r.genuine_accepted}/{r.genuine}), "
                f"threshold {r.threshold:.6f}, {r.impostors_accepted}/{r.impostors} impostors"
            )
    mode = "probe_gallery" if args.gallery else "all_pairs"
    return {"tar_at_far": {"mode": mode, "results": [r.as_dict() for r in results]}}


def run(args: argparse.Namespace) -> int:
    report = args.evaluate(args)
    if args.json and report is not None:
        print(json.dumps(report))
    return 0
