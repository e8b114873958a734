"""The pairs file: a verification set written as text, one pair of image paths a line.

Each line is ``PATH_A PATH_B SAME``: two image paths, relative to the file's folder (or to a
given root; absolute paths stay as they are), and ``SAME`` 1 (or ``true``) when they show the
same person, 0 (or ``false``) when not. Blank lines and lines starting with ``#`` are
skipped; a path cannot contain spaces. ``facescale convert pairs2bin`` packs one into a
``.bin``; ``facescale eval verification`` reads one directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facescale.errors import InputError

SAME_WORDS = {"1": True, "true": True, "0": False, "false": False}


@dataclass(frozen=True)
class PairsList:
    """The pairs of a pairs file: pair ``p`` is images ``paths[p]``, ``issame[p]``, written
    on line ``lines[p]`` of the file."""

    name: str
    paths: list[tuple[Path, Path]]
    issame: np.ndarray
    lines: list[int]


def read_pairs_file(path: str | Path, root: str | Path | None = None) -> PairsList:
    """Parse a pairs file (module docstring), image paths joined to ``root`` (default: the
    file's folder); a malformed line is an :class:`InputError` naming the file and line."""
    path = Path(path)
    base = Path(root) if root else path.parent
    paths: list[tuple[Path, Path]] = []
    issame: list[bool] = []
    numbers: list[int] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            same = SAME_WORDS.get(words[2].lower()) if len(words) == 3 else None
            if same is None:
                raise InputError(
                    f"{path} line {number}: expected 'image_a image_b same' with same 1/0 or "
                    f"true/false, got {' '.join(words)!r}"
                )
            paths.append((base / words[0], base / words[1]))
            issame.append(same)
            numbers.append(number)
    return PairsList(path.stem, paths, np.asarray(issame, dtype=bool), numbers)


def write_pairs_file(
    path: str | Path, pairs: Iterable[tuple[Path, Path, bool]], header: str = ""
) -> Path:
    """Write ``pairs`` (two image paths and whether they show one person) as a pairs file,
    each path relative to the file's folder; ``header``'s lines go first, as comments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    lines = [f"# {text}".rstrip() for text in header.splitlines()]
    for a, b, same in pairs:
        relative = (Path(os.path.relpath(Path(p).resolve(), folder)) for p in (a, b))
        lines.append(" ".join(p.as_posix() for p in relative) + f" {int(same)}")
    path.write_text("\n".join(lines) + "\n")
    return path
