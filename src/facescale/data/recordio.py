"""RecordIO framing as MXNet (dmlc-core) writes it, and the ``.idx`` index beside it.

Every part of a record is ``magic | cflag << 29 | length | data | zero padding to 4 bytes``
(little-endian uint32 words). The writer splits a payload wherever the magic word sits at a
4-byte aligned offset of it and drops that word (cflag 1 = first part, 2 = middle, 3 = last,
0 = the whole record); the reader puts the word back. ``.idx`` lines are ``key<TAB>offset``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from facescale.errors import InputError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
MAX_PART_LENGTH = (1 << LENGTH_BITS) - 1
_PART_HEADER = struct.Struct("<II")


class RecordError(InputError):
    """A record that cannot be read or written; the message names the file, offset or key."""


def _aligned_magic_offsets(payload: bytes) -> Iterator[int]:
    """Offsets where the magic word sits 4-byte aligned inside ``payload`` (dmlc splits there)."""
    i = payload.find(MAGIC_BYTES)
    while i >= 0:
        if i % 4 == 0:
            yield i
            i = payload.find(MAGIC_BYTES, i + 4)
        else:
            i = payload.find(MAGIC_BYTES, i + 1)


def _part(cflag: int, data: bytes) -> bytes:
    return _PART_HEADER.pack(MAGIC, (cflag << LENGTH_BITS) | len(data)) + data


def encode_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc's RecordIOWriter does, split parts and padding included."""
    if len(payload) > MAX_PART_LENGTH:
        raise RecordError(f"a record holds at most {MAX_PART_LENGTH} bytes, got {len(payload)}")
    parts = []
    start = 0
    for i in _aligned_magic_offsets(payload):
        parts.append(_part(1 if start == 0 else 2, payload[start:i]))
        start = i + 4
    parts.append(_part(3 if start else 0, payload[start:]))
    parts.append(b"\0" * (-len(payload) % 4))
    return b"".join(parts)


def decode_record(buf: bytes, pos: int, path: str | Path, base: int = 0) -> tuple[bytes, int]:
    """Read the record at ``buf[pos]``; return its payload and the position after it.

    ``buf`` holds the bytes of ``path`` from file offset ``base``; errors name file offsets.
    """
    start = pos
    parts: list[bytes] = []
    while True:
        at = base + pos
        if pos + 8 > len(buf):
            raise RecordError(
                f"{path}: truncated record at offset {base + start}: the data ends inside the "
                f"part header at offset {at}; the file is incomplete (copy it again)"
            )
        magic, word = _PART_HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RecordError(
                f"{path}: no record at offset {at} (found {magic:#010x}, RecordIO parts start "
                f"with {MAGIC:#010x}): the file is not RecordIO or its .idx does not belong to it"
            )
        cflag, length = word >> LENGTH_BITS, word & MAX_PART_LENGTH
        if cflag > 3 or (cflag in (0, 1)) != (not parts):
            raise RecordError(
                f"{path}: bad continuation flag {cflag} at offset {at} in the record starting "
                f"at offset {base + start}; the file is corrupt"
            )
        end = pos + 8 + length
        if end > len(buf):
            raise RecordError(
                f"{path}: truncated record at offset {base + start}: a part of {length} bytes "
                f"at offset {at} runs past the end of the data; the file is incomplete"
            )
        parts.append(buf[pos + 8 : end])
        pos += 8 + ((length + 3) & ~3)
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts), min(pos, len(buf))


def _parse_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of an ``.idx`` file (``key<TAB>offset`` lines), in file order."""
    tokens = path.read_bytes().split()
    if len(tokens) % 2:
        raise RecordError(f"{path}: expected 'key<TAB>offset' lines; the last line is incomplete")
    try:
        keys = np.array(tokens[0::2], dtype=np.int64)
        offsets = np.array(tokens[1::2], dtype=np.int64)
    except ValueError:
        bad = next(i for i, t in enumerate(tokens) if not t.lstrip(b"-").isdigit())
        raise RecordError(
            f"{path}: line {bad // 2 + 1} is not 'key<TAB>offset' with integers: "
            f"{tokens[bad - bad % 2 : bad - bad % 2 + 2]!r}"
        ) from None
    return keys, offsets


class IndexedRecordFile:
    """Random and sequential access to a ``.rec`` through its ``.idx`` (MXIndexedRecordIO's files).

    Reads use ``os.pread`` on a descriptor opened lazily in each process, so an instance can be
    handed to DataLoader worker processes.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        for p, what in ((self.path, "record file"), (self.idx_path, "index")):
            if not p.is_file():
                raise FileNotFoundError(f"{what} {p} not found")
        self.size = self.path.stat().st_size
        keys, offsets = _parse_index(self.idx_path)
        self._check(keys, offsets)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        by_offset = np.unique(np.append(offsets, self.size))
        self._ends = by_offset[np.searchsorted(by_offset, self._sorted_offsets, side="right")]
        self.keys = keys
        self._fd: int | None = None
        self._pid = -1

    def _check(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        past = np.flatnonzero((offsets < 0) | (offsets + 8 > self.size))
        if past.size:
            i = int(past[0])
            raise RecordError(
                f"{self.idx_path}: key {keys[i]} points at offset {offsets[i]}, past the end of "
                f"{self.path} ({self.size} bytes): the .rec is truncated or the .idx belongs "
                f"to another file"
            )
        uniq, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            raise RecordError(f"{self.idx_path}: key {uniq[counts > 1][0]} is listed twice")

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        i = np.searchsorted(self._sorted_keys, key)
        return bool(i < len(self._sorted_keys) and self._sorted_keys[i] == key)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def span(self, key: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of the record stored under ``key``."""
        i = int(np.searchsorted(self._sorted_keys, key))
        if i == len(self._sorted_keys) or self._sorted_keys[i] != key:
            raise KeyError(f"{self.idx_path}: no key {key}")
        return int(self._sorted_offsets[i]), int(self._ends[i])

    def spans(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte ranges of many keys at once (all must exist)."""
        i = np.searchsorted(self._sorted_keys, keys)
        return self._sorted_offsets[i], self._ends[i]

    def read_bytes(self, start: int, end: int) -> bytes:
        """Raw bytes ``[start, end)`` of the ``.rec`` file, in one read."""
        data = os.pread(self._descriptor(), end - start, start)
        if len(data) != end - start:
            raise RecordError(f"{self.path}: read {len(data)} of {end - start} bytes at {start}")
        return data

    def read(self, key: int) -> bytes:
        """The payload stored under ``key``."""
        start, end = self.span(key)
        return decode_record(self.read_bytes(start, end), 0, self.path, start)[0]

    def iter_file_order(
        self, keys: np.ndarray, chunk_bytes: int = 64 << 20
    ) -> Iterator[tuple[int, bytes]]:
        """Yield ``(key, payload)`` for ``keys`` in file order, reading large contiguous chunks."""
        keys = np.asarray(keys)
        starts, ends = self.spans(keys)
        order = np.argsort(starts, kind="stable")
        i = 0
        while i < len(order):
            first = int(starts[order[i]])
            j = i + 1
            while j < len(order) and ends[order[j]] - first <= chunk_bytes:
                j += 1
            chunk = self.read_bytes(first, int(ends[order[j - 1]]))
            for k in order[i:j]:
                yield (
                    int(keys[k]),
                    decode_record(chunk, int(starts[k]) - first, self.path, first)[0],
                )
            i = j


class IndexedRecordWriter:
    """Write ``.rec`` + ``.idx`` byte-identical to MXNet's ``MXIndexedRecordIO``."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rec = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._idx = open(self.idx_path, "w")  # noqa: SIM115
        self._pos = 0

    def write(self, key: int, payload: bytes) -> None:
        framed = encode_record(payload)
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += len(framed)

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> IndexedRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
