"""`facescale convert`: make and reshape datasets (image folder, InsightFace rec, WebDataset
shards, .bin)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

HELP = (
    "convert datasets: folder -> rec, rec -> shuffled rec, rec -> folder, rec or folder -> "
    "shards, pairs -> .bin"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    pack = sub.add_parser("folder2rec", help="image folder (one sub-folder per identity) -> rec")
    pack.add_argument("src", help="folder of identity folders")
    pack.add_argument("dst", help="output folder for train.rec, train.idx, property")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    pack.add_argument("--skip-bad", action="store_true", help="leave undecodable images out")

    shuffle = sub.add_parser("shuffle", help="rec -> rec in random order (for sequential reading)")
    shuffle.add_argument("src", help="dataset folder holding train.rec, or a .rec file")
    shuffle.add_argument("dst", help="output folder")
    shuffle.add_argument("--seed", type=int, default=0, help="seed of the random order")
    shuffle.add_argument("--memory-mb", type=float, default=2048.0, help="memory to shuffle in")
    shuffle.add_argument(
        "--tmp-dir", default=None, help="folder for spill files (default: beside dst)"
    )

    unpack = sub.add_parser("rec2folder", help="rec -> image folder (DST/<label>/<key>.jpg)")
    unpack.add_argument("src", help="dataset folder holding train.rec, or a .rec file")
    unpack.add_argument("dst", help="output image folder")

    rec_shards = sub.add_parser("rec2shards", help="rec -> WebDataset tar shards")
    rec_shards.add_argument("src", help="dataset folder holding train.rec, or a .rec file")
    folder_shards = sub.add_parser("folder2shards", help="image folder -> WebDataset tar shards")
    folder_shards.add_argument("src", help="folder of identity folders")
    folder_shards.add_argument(
        "--quality", type=int, default=95, help="JPEG quality of re-encoded images"
    )
    folder_shards.add_argument(
        "--skip-bad", action="store_true", help="leave undecodable images out"
    )
    for p in (rec_shards, folder_shards):
        p.add_argument("dst", help="output folder for the shards, their .idx and manifest.json")
        p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
        p.add_argument("--shuffle", action="store_true", help="write the samples in a random order")
        p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")

    pairs = sub.add_parser("pairs2bin", help="pairs list -> verification .bin")
    pairs.add_argument("pairs", help="text file, one 'image_a image_b same(1/0)' per line")
    pairs.add_argument("dst", help="output .bin path")
    pairs.add_argument("--root", default=None, help="folder image paths are relative to")
    pairs.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")

    for p in (pack, pairs):
        p.add_argument(
            "--align",
            action="store_true",
            help="align each face crop to the ArcFace template by its found landmarks "
            "(the 'align' extra)",
        )
    for p in (pack, shuffle, unpack, rec_shards, folder_shards, pairs):
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an existing destination (once the new one is complete)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    align = None
    if getattr(args, "align", False):
        from facescale.landmarks import FaceAligner

        align = FaceAligner()  # a missing extra is a user error here, before any work
    report = _convert(args, align)
    if align is not None:
        align.finder.report(args.src if args.conversion == "folder2rec" else args.pairs)
    if args.json:
        print(json.dumps({"conversion": args.conversion, **dataclasses.asdict(report)}))
    else:
        print(report.summary())
    return 0


def _convert(args: argparse.Namespace, align: Callable[[np.ndarray], np.ndarray] | None):
    from facescale.data import convert

    progress, overwrite = not args.no_progress, args.overwrite
    if args.conversion == "folder2rec":
        return convert.folder_to_rec(
            args.src, args.dst, args.quality, args.skip_bad, progress, overwrite, align
        )
    if args.conversion == "shuffle":
        return convert.shuffle_rec(
            args.src, args.dst, args.seed, args.memory_mb, args.tmp_dir, progress, overwrite
        )
    if args.conversion == "rec2folder":
        return convert.rec_to_folder(args.src, args.dst, progress, overwrite)
    if args.conversion == "rec2shards":
        return convert.rec_to_shards(
            args.src, args.dst, args.shard_size, args.shuffle, args.seed, progress, overwrite
        )
    if args.conversion == "folder2shards":
        return convert.folder_to_shards(
            args.src,
            args.dst,
            args.shard_size,
            args.shuffle,
            args.seed,
            args.quality,
            args.skip_bad,
            progress,
            overwrite,
        )
    return convert.pairs_to_bin(
        args.pairs, args.dst, args.root, args.quality, progress, overwrite, align
    )
