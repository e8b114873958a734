"""Image records inside RecordIO (MXNet's ``IRHeader``) and the InsightFace dataset layout.

A payload is ``flag (uint32) | label (float32) | id (uint64) | id2 (uint64)``, then ``flag``
float32 labels when ``flag > 0``, then the encoded image. InsightFace datasets put a header
record at key 0 (``flag > 0``, no image; ``label[0]`` is one past the last image key and
``label[1]`` one past the last identity record, identities holding ``[start, end)`` key ranges);
plain im2rec files have no header and every key is an image.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facescale.data.recordio import IndexedRecordFile, IndexedRecordWriter, RecordError
from facescale.face import FACE_SIZE

IR_HEADER = struct.Struct("<IfQQ")


@dataclass(frozen=True)
class ImageRecord:
    """One unpacked payload: its labels (one or more floats), ids and encoded image bytes."""

    labels: tuple[float, ...]
    multi_label: bool
    id: int
    id2: int
    image: bytes

    @property
    def label(self) -> float:
        """The class label: the label, or the first of several (as arcface_torch reads it)."""
        return self.labels[0]


def pack_record(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Payload bytes as ``mxnet.recordio.pack`` makes them: a number, or ``flag`` float32s."""
    if isinstance(label, (int, float, np.number)):
        return IR_HEADER.pack(0, float(label), id, id2) + image
    labels = np.asarray(label, dtype="<f4")
    return IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + image


def unpack_record(payload: bytes, where: str) -> ImageRecord:
    """Split a payload into header, labels and image; ``where`` names the record for errors."""
    if len(payload) < IR_HEADER.size:
        raise RecordError(
            f"{where}: record of {len(payload)} bytes is shorter than its {IR_HEADER.size}-byte "
            f"image header"
        )
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    if flag == 0:
        return ImageRecord((label,), False, id_, id2, payload[IR_HEADER.size :])
    end = IR_HEADER.size + 4 * flag
    if end > len(payload):
        raise RecordError(
            f"{where}: the header announces {flag} labels but the record has only "
            f"{len(payload)} bytes; the record is corrupt"
        )
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER.size)
    return ImageRecord(tuple(labels.tolist()), True, id_, id2, payload[end:])


def class_label(record: ImageRecord, num_classes: int, where: str) -> int:
    """The integer class of an image record, checked to lie in ``[0, num_classes)``."""
    value = record.label
    if not math.isfinite(value) or value != int(value) or not 0 <= value < num_classes:
        raise RecordError(
            f"{where}: label {value!r} is not a class in [0, {num_classes}); "
            f"check num_classes in the config or the dataset"
        )
    return int(value)


@dataclass(frozen=True)
class RecLayout:
    """Which keys of an indexed ``.rec`` are images, and what its header record declares."""

    image_keys: np.ndarray
    has_header: bool
    num_identities: int | None

    @property
    def num_images(self) -> int:
        return len(self.image_keys)


def read_layout(rec: IndexedRecordFile) -> RecLayout:
    """Find the image keys: after an InsightFace header record, or every key of a plain file."""
    if 0 in rec:
        head = unpack_record(rec.read(0), f"{rec.path} key 0")
        if head.multi_label and not head.image:
            return _insightface_layout(rec, head)
    return RecLayout(np.sort(rec.keys), has_header=False, num_identities=None)


def _insightface_layout(rec: IndexedRecordFile, head: ImageRecord) -> RecLayout:
    image_end = head.labels[0]
    identity_end = head.labels[1] if len(head.labels) > 1 else image_end
    if image_end != int(image_end) or image_end < 1 or identity_end < image_end:
        raise RecordError(
            f"{rec.path} key 0: header record labels {head.labels[:2]} are not "
            f"(one past the last image key, one past the last identity key)"
        )
    keys = np.sort(rec.keys)
    image_keys = keys[(keys >= 1) & (keys < image_end)]
    if len(image_keys) != int(image_end) - 1:
        raise RecordError(
            f"{rec.idx_path}: the header record declares images at keys 1..{int(image_end) - 1} "
            f"but the index lists {len(image_keys)} of them; rebuild the dataset"
        )
    identities = int(identity_end - image_end)
    return RecLayout(image_keys, has_header=True, num_identities=identities or None)


def write_header_record(
    writer: IndexedRecordWriter,
    num_images: int,
    identity_ranges: Sequence[tuple[int, int]] = (),
) -> None:
    """Write the InsightFace header (key 0) and one ``[start, end)`` record per identity."""
    first_identity = num_images + 1
    writer.write(0, pack_record([first_identity, first_identity + len(identity_ranges)], b""))
    for i, (start, end) in enumerate(identity_ranges):
        writer.write(first_identity + i, pack_record([start, end], b""))


def read_property(folder: Path) -> tuple[int, int, int] | None:
    """``num_classes, height, width`` from an InsightFace ``property`` file, if there is one."""
    path = folder / "property"
    if not path.is_file():
        return None
    fields = path.read_text().strip().split(",")
    try:
        num_classes, height, width = (int(f) for f in fields)
    except ValueError:
        raise RecordError(
            f"{path}: expected 'num_classes,height,width' (e.g. 93431,112,112), "
            f"got {path.read_text().strip()!r}"
        ) from None
    return num_classes, height, width


def write_property(folder: Path, num_classes: int, size: int = FACE_SIZE) -> None:
    (folder / "property").write_text(f"{num_classes},{size},{size}")
