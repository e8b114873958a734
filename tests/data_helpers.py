"""Small datasets for the data tests: 112x112 JPEG faces in a rec or an image folder."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from facescale.data.image import encode_jpeg
from facescale.data.recordio import IndexedRecordFile, IndexedRecordWriter
from facescale.data.records import pack_record, write_header_record, write_property

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATTERNS = 24


@cache
def face_jpeg(i: int) -> bytes:
    """A distinct smooth 112x112 JPEG for each ``i`` (cached: tests reuse a few dozen)."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:112, 0:112] / 112.0
    waves = [np.sin(x * rng.uniform(2, 9) + c) * np.cos(y * rng.uniform(2, 9)) for c in range(3)]
    return encode_jpeg(np.clip(128 + 100 * np.stack(waves, -1), 0, 255).astype(np.uint8))


def write_rec(folder: Path, labels: Sequence[float], classes: int | None = None) -> Path:
    """An InsightFace-layout rec whose image ``i`` (key i+1) is ``face_jpeg(i % PATTERNS)``."""
    with IndexedRecordWriter(folder / "train.rec") as writer:
        write_header_record(writer, len(labels))
        for i, label in enumerate(labels):
            writer.write(i + 1, pack_record(label, face_jpeg(i % PATTERNS), id=i + 1))
    write_property(folder, classes if classes is not None else int(max(labels)) + 1)
    return folder


def corrupt_record(folder: Path, key: int) -> None:
    """Overwrite the magic word of the record stored under ``key`` in ``folder/train.rec``."""
    start, _ = IndexedRecordFile(folder / "train.rec").span(key)
    with open(folder / "train.rec", "r+b") as f:
        f.seek(start)
        f.write(b"\0\0\0\0")
