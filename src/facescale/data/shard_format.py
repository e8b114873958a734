"""The WebDataset shard layout facescale writes and reads.

A shard is a plain tar; a sample is the run of members sharing a key: ``KEY.jpg`` (or another
image suffix) and ``KEY.cls``, the label as decimal text, which is how the ``webdataset``
library reads classification data. Beside the shards, ``manifest.json`` lists them with their
sample counts and the dataset's classes, and each shard's ``.idx`` holds the byte offsets where
its samples start and where the last one ends (little-endian int64), so that a run of
consecutive samples is one ranged read.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from facescale.data.image import image_suffix
from facescale.data.recordio import RecordError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "facescale-webdataset"
LABEL_SUFFIX = "cls"
IMAGE_MEMBER_SUFFIXES = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif"})
INDEX_DTYPE = np.dtype("<i8")


def shard_name(number: int) -> str:
    return f"train-{number:06d}.tar"


def index_name(shard: str) -> str:
    """The index file of shard ``shard``: the same name with ``.idx`` for ``.tar``."""
    return shard.removesuffix(".tar") + ".idx"


def sample_key(number: int, total: int) -> str:
    """The zero-padded key of sample ``number`` of ``total`` (at least six digits)."""
    return f"{number:0{max(6, len(str(total - 1)))}d}"


def member_key(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name, as webdataset splits it: at the first dot of the base."""
    directory, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return f"{directory}/{key}" if directory else key, suffix


class ShardWriter:
    """Writes samples into one tar shard and keeps the offset where each one starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._starts: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, key: str, image: bytes, label: int) -> None:
        """Append sample ``key``: the image bytes unchanged and the label."""
        self._starts.append(self._tar.offset)
        members = ((f"{key}{image_suffix(image)}", image), (f"{key}.{LABEL_SUFFIX}", b"%d" % label))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> np.ndarray:
        """Finish the tar and write its index beside it; return the sample bounds."""
        bounds = np.array([*self._starts, self._tar.offset], dtype=INDEX_DTYPE)
        self._tar.close()
        self._file.close()
        self.path.with_name(index_name(self.path.name)).write_bytes(bounds.tobytes())
        return bounds


def write_manifest(
    folder: Path, shards: list[dict[str, Any]], classes: int, shuffled: bool
) -> Path:
    """``manifest.json``: the shards in reading order with their sample counts, and classes."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "samples": sum(s["samples"] for s in shards),
        "classes": classes,
        "shuffled": shuffled,
        "shards": shards,
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_index(data: bytes, samples: int, where: str) -> np.ndarray:
    """Sample bounds from an index file's bytes, checked against the manifest's count."""
    bounds = np.frombuffer(data, dtype=INDEX_DTYPE) if len(data) % 8 == 0 else np.empty(0)
    if len(bounds) != samples + 1 or np.any(np.diff(bounds) <= 0):
        raise RecordError(
            f"{where}: not the index of a {samples}-sample shard ({len(data)} bytes); write the "
            f"shards again with `facescale convert rec2shards`"
        )
    return bounds


def scan_bounds(file: BinaryIO, stream: bool) -> np.ndarray:
    """Sample bounds of a tar without an index, from its member headers (a full read when
    ``stream``; a local file is read header by header)."""
    bounds: list[int] = []
    last_key, end = None, 0
    with tarfile.open(fileobj=file, mode="r|" if stream else "r:") as tar:
        for info in tar:
            key = member_key(info.name)[0]
            if info.isfile() and key != last_key:
                bounds.append(info.offset)
                last_key = key
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return np.array([*bounds, end], dtype=INDEX_DTYPE)


def sample_members(data: bytes, where: str) -> dict[str, tuple[str, bytes]]:
    """The file members of one sample's tar bytes: suffix -> (member name, content).

    Regular-file headers with the ustar magic (what facescale and most writers produce) are
    read directly, as fast as a record's header; any other header (pax, GNU long names, old
    tars without the magic) or one that does not parse goes through ``tarfile``.
    """
    members: dict[str, tuple[str, bytes]] = {}
    offset = 0
    while offset + tarfile.BLOCKSIZE <= len(data):
        header = data[offset : offset + tarfile.BLOCKSIZE]
        if header[0] == 0:  # an empty name: the end-of-archive blocks
            break
        member = _plain_member(header, data, offset)
        if member is None:
            return members_by_tarfile(data, where)
        name, start, size = member
        members[member_key(name)[1].lower()] = (name, data[start : start + size])
        offset = start + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if not members:
        raise RecordError(f"{where}: no members; the shard or its index is damaged")
    return members


def _plain_member(header: bytes, data: bytes, offset: int) -> tuple[str, int, int] | None:
    """(name, data offset, size) of a regular-file ustar header, or None for anything else.
    The magic, not the checksum, is checked: it is what tells a header from image bytes."""
    if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0"):
        return None
    try:
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    start = offset + tarfile.BLOCKSIZE
    if start + size > len(data):
        return None
    name = header[:100].split(b"\0", 1)[0]
    if header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), start, size


def members_by_tarfile(data: bytes, where: str) -> dict[str, tuple[str, bytes]]:
    """The file members of one sample's tar bytes, read by ``tarfile`` (any tar format)."""
    members: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    content = tar.extractfile(info).read()  # type: ignore[union-attr]
                    members[member_key(info.name)[1].lower()] = (info.name, content)
    except (tarfile.TarError, OSError) as err:
        raise RecordError(f"{where}: not a readable tar sample ({err})") from None
    if not members:
        raise RecordError(f"{where}: no members; the shard or its index is damaged")
    return members


def sample_label(members: dict[str, tuple[str, bytes]], where: str, num_classes: int) -> int:
    """The class of a sample from its ``.cls`` member, checked against ``num_classes``."""
    if LABEL_SUFFIX not in members:
        names = ", ".join(name for name, _ in members.values())
        raise RecordError(f"{where}: no .{LABEL_SUFFIX} label member (has {names})")
    name, text = members[LABEL_SUFFIX]
    try:
        label = int(text.strip())
    except ValueError:
        raise RecordError(f"{where} member {name}: label {text[:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise RecordError(
            f"{where} member {name}: label {label} is not a class in [0, {num_classes}); "
            f"check num_classes"
        )
    return label


def sample_image(members: dict[str, tuple[str, bytes]], where: str) -> tuple[str, bytes]:
    """(member name, encoded bytes) of a sample's image."""
    for suffix, member in members.items():
        if suffix in IMAGE_MEMBER_SUFFIXES:
            return member
    names = ", ".join(name for name, _ in members.values())
    raise RecordError(f"{where}: no image member ({names})")
