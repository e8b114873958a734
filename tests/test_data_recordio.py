"""RecordIO framing and image records against MXNet-written golden files and a reference."""

import base64
import json
import shutil
import struct

import numpy as np
import pytest
from data_helpers import FIXTURES

from facescale.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IndexedRecordFile,
    IndexedRecordWriter,
    RecordError,
    decode_record,
    encode_record,
)
from facescale.data.records import class_label, pack_record, read_layout, unpack_record

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def reference_frame(payload: bytes) -> bytes:
    """dmlc's RecordIOWriter::WriteRecord transcribed word by word (slow, obviously faithful)."""
    out, done = b"", 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i : i + 4] == MAGIC_BYTES:
            flag = 1 if done == 0 else 2
            out += struct.pack("<II", MAGIC, flag << 29 | (i - done)) + payload[done:i]
            done = i + 4
    flag = 3 if done else 0
    out += struct.pack("<II", MAGIC, flag << 29 | (len(payload) - done)) + payload[done:]
    return out + b"\0" * ((4 - len(payload) % 4) % 4)


def payload_with_magic(rng: np.random.Generator) -> bytes:
    data = bytearray(rng.integers(0, 256, int(rng.integers(0, 120)), dtype=np.uint8).tobytes())
    for _ in range(int(rng.integers(0, 4))):
        at = int(rng.integers(0, len(data) + 1))
        data[at:at] = MAGIC_BYTES  # aligned or not, at the start, the end, back to back
    return bytes(data)


def test_framing_matches_dmlc_reference_and_round_trips():
    rng = np.random.default_rng(0)
    split = 0
    for _ in range(500):
        payload = payload_with_magic(rng)
        framed = encode_record(payload)
        assert framed == reference_frame(payload)
        assert len(framed) % 4 == 0
        assert decode_record(framed, 0, "mem") == (payload, len(framed))
        split += framed.count(MAGIC_BYTES) > 1
    assert split > 50  # the planted magic words really split records


def part_flags(data: bytes) -> list[int]:
    flags, pos = [], 0
    while pos < len(data):
        magic, word = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        flags.append(word >> 29)
        pos += 8 + ((word & (2**29 - 1)) + 3) // 4 * 4
    return flags


@pytest.mark.parametrize("name", ["mxnet_plain", "mxnet_insightface"])
def test_reads_mxnet_written_files(name):
    rec = IndexedRecordFile(FIXTURES / f"{name}.rec")
    for entry in MANIFEST[name]:
        record = unpack_record(rec.read(entry["key"]), name)
        assert list(record.labels) == entry["labels"]
        assert record.multi_label == entry["multi"]
        assert (record.id, record.id2) == (entry["id"], entry["id2"])
        assert record.image == base64.b64decode(entry["image"])


def test_golden_file_holds_split_records():
    flags = part_flags((FIXTURES / "mxnet_plain.rec").read_bytes())
    assert {0, 1, 2, 3} <= set(flags)


@pytest.mark.parametrize("name", ["mxnet_plain", "mxnet_insightface"])
def test_writer_is_byte_identical_to_mxnet(tmp_path, name):
    with IndexedRecordWriter(tmp_path / "out.rec") as writer:
        for e in MANIFEST[name]:
            label = e["labels"] if e["multi"] else e["labels"][0]
            image = base64.b64decode(e["image"])
            writer.write(e["key"], pack_record(label, image, e["id"], e["id2"]))
    assert (tmp_path / "out.rec").read_bytes() == (FIXTURES / f"{name}.rec").read_bytes()
    assert (tmp_path / "out.idx").read_text() == (FIXTURES / f"{name}.idx").read_text()


def test_layout_with_and_without_header_record():
    plain = read_layout(IndexedRecordFile(FIXTURES / "mxnet_plain.rec"))
    assert not plain.has_header and plain.image_keys.tolist() == list(range(7))
    face = read_layout(IndexedRecordFile(FIXTURES / "mxnet_insightface.rec"))
    assert face.has_header and face.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert face.num_identities == 3


def test_file_order_reading_equals_random_access():
    rec = IndexedRecordFile(FIXTURES / "mxnet_insightface.rec")
    keys = np.array([6, 1, 3, 2, 5, 4, 8])
    for chunk in (1, 1000, 1 << 20):
        got = dict(rec.iter_file_order(keys, chunk_bytes=chunk))
        assert got == {int(k): rec.read(int(k)) for k in keys}


def test_multi_float_label_uses_the_first():
    record = unpack_record(pack_record([7.0, 0.25, 3.5], b"img"), "mem")
    assert record.labels == (7.0, 0.25, 3.5) and record.image == b"img"
    assert class_label(record, 8, "mem") == 7


@pytest.mark.parametrize("label", [8.0, -1.0, 2.5, float("nan")])
def test_label_outside_classes_names_the_record(label):
    with pytest.raises(RecordError, match=r"train.rec key 5: label"):
        class_label(unpack_record(pack_record(label, b""), "x"), 8, "train.rec key 5")


@pytest.fixture
def plain_copy(tmp_path):
    for suffix in (".rec", ".idx"):
        shutil.copy(FIXTURES / f"mxnet_plain{suffix}", tmp_path / f"d{suffix}")
    return tmp_path / "d.rec"


def test_index_past_the_end_is_refused(plain_copy):
    data = plain_copy.read_bytes()
    plain_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match=r"d.idx: key \d+ points at offset \d+, past the end"):
        IndexedRecordFile(plain_copy)


def test_truncated_record_names_file_and_offset(plain_copy):
    start, end = IndexedRecordFile(plain_copy).span(6)  # the last record
    plain_copy.write_bytes(plain_copy.read_bytes()[: end - 8])
    with pytest.raises(RecordError, match=rf"d.rec: truncated record at offset {start}"):
        IndexedRecordFile(plain_copy).read(6)


def test_wrong_magic_names_file_and_offset(plain_copy):
    idx = plain_copy.with_suffix(".idx")
    idx.write_text(idx.read_text().replace("\t884\n", "\t888\n"))
    with pytest.raises(RecordError, match=r"d.rec: no record at offset 888"):
        IndexedRecordFile(plain_copy).read(1)


def test_bad_continuation_flag_is_refused():
    framed = bytearray(encode_record(b"abcd" + MAGIC_BYTES + b"efgh"))
    framed[7] = 2 << 5  # first part claims to be a middle part
    with pytest.raises(RecordError, match="bad continuation flag 2"):
        decode_record(bytes(framed), 0, "x.rec")


def test_bad_index_lines_are_refused(tmp_path):
    (tmp_path / "a.rec").write_bytes(encode_record(b"x") * 2)
    (tmp_path / "a.idx").write_text("0\t0\n0\t12\n")
    with pytest.raises(RecordError, match="key 0 is listed twice"):
        IndexedRecordFile(tmp_path / "a.rec")
    (tmp_path / "a.idx").write_text("0\t0\nseven\t12\n")
    with pytest.raises(RecordError, match="line 2 is not 'key<TAB>offset'"):
        IndexedRecordFile(tmp_path / "a.rec")


def test_short_multi_label_record_is_refused():
    payload = pack_record([1.0, 2.0, 3.0], b"")[:-4]
    with pytest.raises(RecordError, match="announces 3 labels"):
        unpack_record(payload, "x key 1")
