"""A verification set written as a text file of image pairs, to check a model on photos of
one's own without converting them to a ``.bin``.

Each line is ``PATH_A PATH_B SAME``: two image paths, relative to the file's folder (or
absolute), and ``1`` when they show the same person, ``0`` when not. Blank lines and lines
starting with ``#`` are skipped; a path cannot contain spaces. The images are prepared as
``facescale embed`` prepares them (:class:`facescale.eval.align.FaceCrops`: a 112x112 crop is
taken as it is, any other size is scaled to cover and centre-cropped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facescale.errors import InputError
from facescale.eval.align import FaceCrops
from facescale.eval.verification import VerificationSet

PAIR_FORMAT = "PATH_A PATH_B SAME (SAME is 1 for the same person, 0 for different people)"


@dataclass(frozen=True)
class PairsList:
    """The pairs of a pairs file: ``paths[p]`` holds pair ``p``'s two image paths."""

    name: str
    paths: list[tuple[Path, Path]]
    issame: np.ndarray


def read_pairs_file(path: str | Path) -> PairsList:
    """Parse a pairs file (module docstring); a malformed line or a missing image is an
    :class:`InputError` naming the file and line."""
    path = Path(path)
    folder = path.parent
    paths: list[tuple[Path, Path]] = []
    issame: list[bool] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) != 3 or words[2] not in ("0", "1"):
                raise InputError(f"{path}:{number}: {line.strip()!r} is not {PAIR_FORMAT}")
            pair = (folder / words[0], folder / words[1])
            for image in pair:
                if not image.is_file():
                    raise InputError(f"{path}:{number}: image {image} not found")
            paths.append(pair)
            issame.append(words[2] == "1")
    if not paths:
        raise InputError(f"{path}: no pairs; each line is {PAIR_FORMAT}")
    return PairsList(path.stem, paths, np.asarray(issame, dtype=bool))


def write_pairs_file(
    path: str | Path, pairs: list[tuple[Path, Path, bool]], header: str = ""
) -> Path:
    """Write ``pairs`` (two image paths and whether they match) as a pairs file, each path
    relative to the file's folder; ``header`` lines go first as comments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    lines = [f"# {text}".rstrip() for text in header.splitlines()]
    for a, b, same in pairs:
        relative = (Path(os.path.relpath(Path(p).resolve(), folder)) for p in (a, b))
        lines.append(" ".join(p.as_posix() for p in relative) + f" {int(same)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def load_pairs_set(path: str | Path) -> VerificationSet:
    """A pairs file as a decoded verification set; each image is read once however many
    pairs it is in."""
    pairs = read_pairs_file(path)
    listed = [image for pair in pairs.paths for image in pair]
    unique = list(dict.fromkeys(listed))
    crops = FaceCrops(unique)
    decoded = np.stack([crops[i].numpy() for i in range(len(unique))])
    where = {image: i for i, image in enumerate(unique)}
    images = decoded[[where[image] for image in listed]]
    return VerificationSet(pairs.name, images, pairs.issame)
