"""Where training images come from: an indexed ``.rec``, an image folder, or synthetic data.

A source numbers its images ``0..len-1`` (for a ``.rec``, in file order, so consecutive
positions are consecutive bytes). ``fetch`` reads the raw data of many positions at once,
keeping a per-record failure as the value of that record; ``parse`` turns one raw record into
``(label, 112x112x3 uint8 image)`` or raises RecordError naming the file and key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facescale.data.image import ImageDecodeError, decode_image, fit_face
from facescale.data.recordio import IndexedRecordFile, RecordError, decode_record
from facescale.data.records import class_label, read_layout, read_property, unpack_record
from facescale.face import FACE_SIZE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".webp", ".tif", ".tiff"}
)
SORTED_PROBE = 256


class Source(Protocol):
    """What the loader needs from a source of labelled images."""

    num_classes: int

    def __len__(self) -> int: ...

    def describe(self) -> str: ...

    def declared_classes(self) -> int | None: ...

    def fetch(self, positions: np.ndarray) -> list[Any]: ...

    def parse(self, position: int, raw: Any) -> tuple[int, np.ndarray]: ...


def decode_face(data: bytes, where: str) -> np.ndarray:
    """Decode and fit to 112x112, or raise RecordError naming ``where``."""
    try:
        return fit_face(decode_image(data))
    except ImageDecodeError as err:
        raise RecordError(f"{where}: {err}") from None


class RecordSource:
    """Images of an indexed ``.rec`` (InsightFace layout or plain im2rec), in file order."""

    def __init__(self, rec_path: str | Path, num_classes: int) -> None:
        self.file = IndexedRecordFile(rec_path)
        self.layout = read_layout(self.file)
        starts, _ = self.file.spans(self.layout.image_keys)
        self.keys = self.layout.image_keys[np.argsort(starts, kind="stable")]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> str:
        return str(self.file.path)

    def declared_classes(self) -> int | None:
        prop = read_property(self.file.path.parent)
        return prop[0] if prop else self.layout.num_identities

    def _where(self, position: int) -> str:
        return f"{self.file.path} key {self.keys[position]}"

    def fetch(self, positions: np.ndarray) -> list[bytes | RecordError]:
        """Payloads of ``positions``: each run of consecutive positions is one read."""
        positions = np.asarray(positions)
        order = np.argsort(positions, kind="stable")
        starts, ends = self.file.spans(self.keys[positions[order]])
        out: list[Any] = [None] * len(positions)
        run_breaks = np.flatnonzero(np.diff(positions[order]) != 1) + 1
        for run in np.split(np.arange(len(order)), run_breaks):
            base = int(starts[run[0]])
            chunk = self.file.read_bytes(base, int(ends[run[-1]]))
            for i in run:
                try:
                    out[order[i]] = decode_record(
                        chunk, int(starts[i]) - base, self.file.path, base
                    )[0]
                except RecordError as err:
                    out[order[i]] = RecordError(f"{err} (key {self.keys[positions[order[i]]]})")
        return out

    def parse(self, position: int, raw: bytes | RecordError) -> tuple[int, np.ndarray]:
        if isinstance(raw, RecordError):
            raise raw
        where = self._where(position)
        record = unpack_record(raw, where)
        return class_label(record, self.num_classes, where), decode_face(record.image, where)

    def looks_sorted(self) -> bool:
        """True when the first records' labels never decrease: a file sorted by identity."""
        positions = np.arange(min(SORTED_PROBE, len(self)))
        labels = [
            unpack_record(raw, self._where(p)).label
            for p, raw in zip(positions, self.fetch(positions), strict=True)
            if not isinstance(raw, RecordError)
        ]
        return len(labels) > 1 and bool(np.all(np.diff(labels) >= 0))


class FolderSource:
    """An image folder: one sub-folder per identity, labels from the sorted folder names."""

    def __init__(self, root: str | Path, num_classes: int) -> None:
        self.root = Path(root)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.files: list[Path] = []
        labels = []
        for label, name in enumerate(self.classes):
            images = list_images(self.root / name)
            if not images:
                log.warning("%s: identity folder has no images; label %d is unused", name, label)
            self.files.extend(images)
            labels.extend([label] * len(images))
        if not self.files:
            raise FileNotFoundError(
                f"{self.root}: no images in sub-folders; an image folder holds one sub-folder "
                f"per identity (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.labels = np.array(labels, dtype=np.int64)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return str(self.root)

    def declared_classes(self) -> int:
        return len(self.classes)

    def fetch(self, positions: np.ndarray) -> list[bytes | OSError]:
        out: list[Any] = []
        for p in positions:
            try:
                out.append(self.files[p].read_bytes())
            except OSError as err:
                out.append(err)
        return out

    def parse(self, position: int, raw: bytes | OSError) -> tuple[int, np.ndarray]:
        where = str(self.files[position])
        if isinstance(raw, OSError):
            raise RecordError(f"{where}: cannot read: {raw}")
        label = int(self.labels[position])
        if label >= self.num_classes:
            raise RecordError(
                f"{where}: identity folder number {label} (sorted) is outside num_classes="
                f"{self.num_classes}; raise num_classes to at least {len(self.classes)}"
            )
        return label, decode_face(raw, where)


def list_images(folder: Path) -> list[Path]:
    """Image files of one identity folder, sorted by name, hidden files left out."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


class SyntheticSource:
    """Random images with labels ``position % num_classes``: no IO, no decoding (speed tests)."""

    PATTERNS = 16

    def __init__(self, num_images: int, num_classes: int, seed: int = 0) -> None:
        self.num_images, self.num_classes = num_images, num_classes
        shape = (self.PATTERNS, FACE_SIZE, FACE_SIZE, 3)
        self.images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)

    def __len__(self) -> int:
        return self.num_images

    def describe(self) -> str:
        return "synthetic"

    def declared_classes(self) -> int:
        return self.num_classes

    def fetch(self, positions: np.ndarray) -> list[None]:
        return [None] * len(positions)

    def parse(self, position: int, raw: None) -> tuple[int, np.ndarray]:
        return int(position) % self.num_classes, self.images[position % self.PATTERNS]
