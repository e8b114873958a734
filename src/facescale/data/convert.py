"""Dataset converters behind `facescale convert`: folder -> rec, rec -> shuffled rec, rec ->
folder, rec or folder -> WebDataset shards, and a verification ``.bin`` from a list of pairs.

Record datasets are written as InsightFace lays them out: ``train.rec``, ``train.idx`` and
``property`` in one folder, a header record at key 0 and images at keys ``1..N``. Shards are
written as ``shard_format`` lays them out. Every output is written beside its destination and
moved into place only when complete (see ``staging``).
"""

from __future__ import annotations

import logging
import math
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from facescale.data.bin_format import write_verification_bin
from facescale.data.image import JPEG_QUALITY, ImageDecodeError, face_bytes, image_suffix
from facescale.data.pairs_file import read_pairs_file
from facescale.data.recordio import IndexedRecordFile, IndexedRecordWriter, RecordError
from facescale.data.records import (
    class_label,
    pack_record,
    read_layout,
    read_property,
    unpack_record,
    write_header_record,
    write_property,
)
from facescale.data.shard_format import (
    ShardWriter,
    index_name,
    sample_key,
    shard_name,
    write_manifest,
)
from facescale.data.sources import FolderSource, RecordSource, list_images
from facescale.data.staging import staged_file, staged_folder
from facescale.errors import InputError

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
BUCKET_HEADROOM = 1.5


@dataclass
class Report:
    """What a conversion to a dataset or an image folder wrote (and skipped)."""

    output: str
    images: int
    classes: int
    skipped: int = 0

    def summary(self) -> str:
        skipped = f", skipped {self.skipped}" if self.skipped else ""
        return f"wrote {self.output}: {self.images} images, {self.classes} classes{skipped}"


@dataclass
class ShardsReport(Report):
    """What a conversion to shards wrote: a Report and the number of shards."""

    shards: int = 0

    def summary(self) -> str:
        return f"{super().summary()} in {self.shards} shards"


@dataclass
class PairsReport:
    """What ``pairs_to_bin`` wrote: a verification set of ``pairs`` pairs, two images each."""

    output: str
    pairs: int
    images: int

    def summary(self) -> str:
        return f"wrote {self.output}: {self.pairs} pairs, {self.images} images"


def rec_path(path: str | Path) -> Path:
    """``train.rec`` inside a dataset folder, or the ``.rec`` file given."""
    path = Path(path)
    return path / "train.rec" if path.is_dir() else path


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)


def folder_to_rec(
    src: str | Path,
    dst: str | Path,
    quality: int = JPEG_QUALITY,
    skip_bad: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    align: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Report:
    """Pack an image folder (one sub-folder per identity) into an InsightFace-layout rec.

    Labels follow the sorted sub-folder names. 112x112 JPEG/PNG files are stored unchanged;
    others are scaled to cover 112x112, centre-cropped and encoded as JPEG. With ``align`` (an
    image to its 112x112 face, such as :class:`facescale.landmarks.FaceAligner`) every image
    is aligned by it and encoded as JPEG.
    """
    with staged_folder(src, dst, overwrite, dst_inside_src_ok=False) as out:
        images, classes, skipped = _pack_folder(Path(src), out, quality, skip_bad, progress, align)
    if skipped:
        log.warning("%s: skipped %d undecodable images", src, skipped)
    return Report(str(dst), images, classes, skipped)


def _pack_folder(
    src: Path,
    dst: Path,
    quality: int,
    skip_bad: bool,
    progress: bool,
    align: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[int, int, int]:
    """Write ``dst/train.rec``, ``.idx`` and ``property``; return images, classes, skipped."""
    classes = sorted(d for d in src.iterdir() if d.is_dir())
    files = [(label, f) for label, d in enumerate(classes) for f in list_images(d)]
    if not files:
        raise FileNotFoundError(f"{src}: no images in sub-folders (one sub-folder per identity)")
    ranges: list[list[int]] = [[0, 0] for _ in classes]
    key, skipped = 1, 0
    with (
        IndexedRecordWriter(dst / "train.rec") as writer,
        _bar(len(files), "pack", progress) as bar,
    ):
        for label, path in files:
            bar.update()
            try:
                image = face_bytes(path.read_bytes(), quality, align)
            except ImageDecodeError as err:
                if not skip_bad:
                    raise RecordError(f"{path}: {err}; pass --skip-bad to leave it out") from None
                skipped += 1
                continue
            if ranges[label][1] == 0:
                ranges[label][0] = key
            ranges[label][1] = key + 1
            writer.write(key, pack_record(float(label), image, id=key))
            key += 1
        write_header_record(writer, key - 1, [tuple(r) for r in ranges])
    write_property(dst, len(classes))
    return key - 1, len(classes), skipped


def _image_payloads(
    rec: IndexedRecordFile, keys: np.ndarray, desc: str, progress: bool
) -> Iterator[tuple[int, bytes]]:
    with _bar(len(keys), desc, progress) as bar:
        for key, payload in rec.iter_file_order(keys):
            bar.update()
            yield key, payload


def _write_spill(handle: BinaryIO, payload: bytes) -> None:
    handle.write(_LENGTH.pack(len(payload)))
    handle.write(payload)


def _read_spill(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        out.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out


def _shuffled_payloads(
    rec: IndexedRecordFile,
    keys: np.ndarray,
    rng: np.random.Generator,
    buckets: int,
    tmp: Path,
    progress: bool,
) -> Iterator[bytes]:
    """Payloads in a uniformly random order holding at most about one bucket in memory.

    Each record goes to a random bucket file (one sequential pass), then each bucket is read,
    shuffled in memory and emitted: a random bucket then a random order inside it is a
    uniformly random permutation.
    """
    if buckets == 1:
        payloads = [p for _, p in _image_payloads(rec, keys, "read", progress)]
        for i in rng.permutation(len(payloads)):
            yield payloads[i]
        return
    paths = [tmp / f"bucket{b:05d}" for b in range(buckets)]
    handles = [open(p, "wb") for p in paths]  # noqa: SIM115 (closed below)
    try:
        targets = rng.integers(0, buckets, size=len(keys), dtype=np.int32)
        for i, (_, payload) in enumerate(_image_payloads(rec, keys, "spread", progress)):
            _write_spill(handles[targets[i]], payload)
    finally:
        for h in handles:
            h.close()
    for path in paths:
        payloads = _read_spill(path)
        path.unlink()
        for i in rng.permutation(len(payloads)):
            yield payloads[i]


def shuffle_rec(
    src: str | Path,
    dst: str | Path,
    seed: int = 0,
    memory_mb: float = 2048.0,
    tmp_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Report:
    """Write the images of ``src`` in a random order to ``dst``, for sequential reading.

    Memory stays near ``memory_mb`` whatever the file size: larger inputs are spread over
    bucket files in ``tmp_dir`` (default: the folder being written beside ``dst``) and
    shuffled one bucket at a time. The output has the header record (key 0, no identity
    ranges), images at keys 1..N with their payloads unchanged, and the source's ``property``.
    """
    with staged_folder(src, dst, overwrite) as out:
        rec = IndexedRecordFile(rec_path(src))
        keys = read_layout(rec).image_keys
        starts, ends = rec.spans(keys)
        total_bytes = int((ends - starts).sum())
        buckets = max(1, math.ceil(total_bytes * BUCKET_HEADROOM / (memory_mb * 2**20)))
        rng = np.random.default_rng(seed)
        classes = _num_classes(rec, keys)
        tmp = Path(tempfile.mkdtemp(prefix="facescale-shuffle-", dir=tmp_dir or out))
        try:
            with IndexedRecordWriter(out / "train.rec") as writer:
                write_header_record(writer, len(keys))
                payloads = _shuffled_payloads(rec, keys, rng, buckets, tmp, progress)
                for key, payload in enumerate(payloads, start=1):
                    writer.write(key, payload)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_property(out, classes)
    return Report(str(dst), len(keys), classes)


def _num_classes(rec: IndexedRecordFile, keys: np.ndarray) -> int:
    """Classes from ``property`` beside the rec, else one past the largest label."""
    prop = read_property(rec.path.parent)
    if prop is not None:
        return prop[0]
    labels = (unpack_record(p, f"{rec.path} key {k}").label for k, p in rec.iter_file_order(keys))
    return int(max(labels)) + 1


def rec_to_folder(
    src: str | Path, dst: str | Path, progress: bool = True, overwrite: bool = False
) -> Report:
    """Unpack a rec into ``dst/<label>/<key>.<ext>``, the image bytes unchanged.

    Every class gets a folder (empty ones too) named by its zero-padded label, so packing the
    folder again gives back the same labels.
    """
    with staged_folder(src, dst, overwrite) as out:
        rec = IndexedRecordFile(rec_path(src))
        keys = read_layout(rec).image_keys
        classes = _num_classes(rec, keys)
        width = len(str(classes - 1))
        for label in range(classes):
            (out / f"{label:0{width}d}").mkdir()
        for key, payload in _image_payloads(rec, keys, "unpack", progress):
            where = f"{rec.path} key {key}"
            record = unpack_record(payload, where)
            label = class_label(record, classes, where)
            name = f"{key}{image_suffix(record.image)}"
            (out / f"{label:0{width}d}" / name).write_bytes(record.image)
    return Report(str(dst), len(keys), classes)


SHARD_READ_CHUNK = 1024


def rec_to_shards(
    src: str | Path,
    dst: str | Path,
    shard_size: int,
    shuffle: bool = False,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> ShardsReport:
    """Write the images of a rec as WebDataset shards of ``shard_size`` samples, the image bytes
    unchanged; ``shuffle`` writes them in a random order (seeded), mixing identities across
    shards."""
    with staged_folder(src, dst, overwrite) as out:
        source = RecordSource(rec_path(src), 1)
        classes = _num_classes(source.file, source.keys)

        def sample(position: int, raw: bytes | RecordError) -> tuple[bytes, int]:
            if isinstance(raw, RecordError):
                raise raw
            where = f"{source.file.path} key {source.keys[position]}"
            record = unpack_record(raw, where)
            return record.image, class_label(record, classes, where)

        written, shards = _write_shards(
            source, sample, out, classes, shard_size, shuffle, seed, progress
        )
    return ShardsReport(str(dst), written, classes, shards=shards)


def folder_to_shards(
    src: str | Path,
    dst: str | Path,
    shard_size: int,
    shuffle: bool = False,
    seed: int = 0,
    quality: int = JPEG_QUALITY,
    skip_bad: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> ShardsReport:
    """Write an image folder (one sub-folder per identity) as WebDataset shards; images are
    stored or fitted to 112x112 as ``folder2rec`` does, labels follow the sorted folder names."""
    with staged_folder(src, dst, overwrite, dst_inside_src_ok=False) as out:
        source = FolderSource(src, 1)
        classes = source.declared_classes()

        def sample(position: int, raw: bytes | OSError) -> tuple[bytes, int] | None:
            path = source.files[position]
            try:
                if isinstance(raw, OSError):
                    raise RecordError(f"{path}: cannot read: {raw}")
                return face_bytes(raw, quality), int(source.labels[position])
            except ImageDecodeError as err:
                if skip_bad:
                    return None
                raise RecordError(f"{path}: {err}; pass --skip-bad to leave it out") from None

        written, shards = _write_shards(
            source, sample, out, classes, shard_size, shuffle, seed, progress
        )
    skipped = len(source) - written
    if skipped:
        log.warning("%s: skipped %d undecodable images", src, skipped)
    return ShardsReport(str(dst), written, classes, skipped, shards)


def _write_shards(
    source: RecordSource | FolderSource,
    sample: Callable[[int, object], tuple[bytes, int] | None],
    out: Path,
    classes: int,
    shard_size: int,
    shuffle: bool,
    seed: int,
    progress: bool,
) -> tuple[int, int]:
    """Shards of ``sample(position, raw)`` for every position of ``source`` (in a seeded random
    order when ``shuffle``; a None sample is left out) and their manifest: (samples, shards)."""
    if shard_size < 1:
        raise InputError(f"--shard-size {shard_size}: a shard holds at least one sample")
    total = len(source)
    order = np.random.default_rng(seed).permutation(total) if shuffle else np.arange(total)
    entries: list[dict[str, object]] = []
    writer: ShardWriter | None = None
    written = 0

    def finish(writer: ShardWriter) -> None:
        writer.close()
        name = writer.path.name
        entries.append({"name": name, "samples": len(writer), "index": index_name(name)})

    with _bar(total, "shards", progress) as bar:
        for start in range(0, total, SHARD_READ_CHUNK):
            chunk = order[start : start + SHARD_READ_CHUNK]
            for position, raw in zip(chunk.tolist(), source.fetch(chunk), strict=True):
                bar.update()
                made = sample(position, raw)
                if made is None:
                    continue
                if writer is None or len(writer) == shard_size:
                    if writer is not None:
                        finish(writer)
                    writer = ShardWriter(out / shard_name(len(entries)))
                writer.add(sample_key(written, total), *made)
                written += 1
    if writer is None:
        raise RecordError(f"{out}: no sample could be written")
    finish(writer)
    write_manifest(out, entries, classes, shuffle)
    return written, len(entries)


def pairs_to_bin(
    pairs: str | Path,
    dst: str | Path,
    root: str | Path | None = None,
    quality: int = JPEG_QUALITY,
    progress: bool = True,
    overwrite: bool = False,
    align: Callable[[np.ndarray], np.ndarray] | None = None,
) -> PairsReport:
    """A verification ``.bin`` from lines ``image_a image_b same`` (same: 1/0, true/false).

    Paths are relative to ``root`` (default: the pairs file's folder). 112x112 JPEG/PNG images
    are stored unchanged; others are fitted to 112x112 and encoded as JPEG. With ``align``
    every image is aligned by its found landmarks, as :func:`folder_to_rec` aligns.
    """
    with staged_file(pairs, dst, overwrite) as out:
        images, issame = _read_pairs(Path(pairs), root, quality, progress, align)
        write_verification_bin(out, images, issame)
    return PairsReport(str(dst), len(issame), len(images))


def _read_pairs(
    pairs: Path,
    root: str | Path | None,
    quality: int,
    progress: bool,
    align: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[list[bytes], list[bool]]:
    """The encoded images (two per pair, in order) and the ``same`` flag of each pair."""
    listed = read_pairs_file(pairs, root)
    images = []
    numbered = list(zip(listed.lines, listed.paths, strict=True))
    for n, pair in tqdm(numbered, desc="pairs", unit="pair", disable=not progress):
        for image in pair:
            try:
                images.append(face_bytes(image.read_bytes(), quality, align))
            except (OSError, ImageDecodeError) as err:
                raise RecordError(f"{pairs} line {n}: {image}: {err}") from None
    return images, listed.issame.tolist()
