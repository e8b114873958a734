"""`facescale embed`: image files or folders to a .npy of L2-normalised embeddings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from facescale.commands.export import add_model_arguments, load_model
from facescale.errors import InputError, require_writable_folder

HELP = (
    "embed images or folders of images into a .npy (aligned when landmarks are given or "
    "found, otherwise fitted to 112x112)"
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="image files, and folders searched for images",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT.npy", help="embeddings file")
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--landmarks",
        metavar="FILE",
        help="rows `name x1 y1 ... x5 y5 [score]`; images are aligned to the ArcFace template",
    )
    given.add_argument(
        "--align",
        action="store_true",
        help="align each face crop by its found landmarks (the 'align' extra)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image loading processes")
    parser.add_argument("--no-flip", action="store_true", help="do not add the mirror image")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def image_paths(inputs: list[str]) -> list[Path]:
    """The given files, and the images under the given folders (recursively, sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{item}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    return paths


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from facescale.export import embed_files, landmarks_for, read_landmarks

    output = Path(args.output).with_suffix(".npy")
    require_writable_folder(output.parent)
    paths = image_paths(args.inputs)
    landmarks = None
    if args.landmarks:
        table = read_landmarks(args.landmarks)
        landmarks = landmarks_for(paths, table, Path(args.landmarks))
    elif args.align:
        from facescale.landmarks import find_landmarks

        landmarks = find_landmarks(paths, "the images to embed")
    model, device = load_model(args)
    embeddings = embed_files(
        model, paths, landmarks, args.batch_size, device, not args.no_flip, args.workers
    )
    np.save(output, embeddings)
    listing = output.with_suffix(".txt")
    listing.write_text("".join(f"{p}\n" for p in paths))
    report = {
        "embeddings": str(output),
        "paths": str(listing),
        "count": len(paths),
        "dim": int(embeddings.shape[1]),
        "aligned": landmarks is not None,
        "flip": not args.no_flip,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {len(paths)} embeddings of size {report['dim']} to {output}")
        print(f"row i is the image on line i of {listing}")
    return 0
