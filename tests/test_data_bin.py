"""Verification .bin files: InsightFace's pickles read safely, written readably."""

import base64
import json
import os
import pickle

import numpy as np
import pytest
from data_helpers import FIXTURES, face_jpeg

from facescale.data import decode_image, load_verification_bin, write_verification_bin

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["verification"]


@pytest.mark.parametrize("name", ["verification_py2.bin", "verification_ndarray.bin"])
def test_reads_published_forms(name):
    images, issame = load_verification_bin(FIXTURES / name)
    assert [bytes(i) for i in images] == [base64.b64decode(s) for s in MANIFEST["images"]]
    assert issame.dtype == bool and issame.tolist() == MANIFEST["issame"]
    assert decode_image(images[0]).shape == (16, 16, 3)


def test_write_then_load_round_trip(tmp_path):
    images = [face_jpeg(i) for i in range(6)]
    images[1] = np.frombuffer(images[1], dtype=np.uint8)
    write_verification_bin(tmp_path / "x.bin", images, [True, False, True])
    loaded, issame = load_verification_bin(tmp_path / "x.bin")
    assert [bytes(i) for i in loaded] == [bytes(i) for i in images]
    assert issame.tolist() == [True, False, True]
    with open(tmp_path / "x.bin", "rb") as f:  # what InsightFace's own reader does
        plain_images, plain_issame = pickle.load(f, encoding="bytes")
    assert plain_images == [bytes(i) for i in images] and plain_issame == [True, False, True]


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsGlobal:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = ([RunsCommand(f"touch {marker}")], [True])
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(ValueError, match="refusing to load"):
        load_verification_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    assert pickle.loads((tmp_path / "evil.bin").read_bytes()) is not None  # the payload is real
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        CallsGlobal(eval, "1+1"),
        CallsGlobal(getattr, b"x", "upper"),
        CallsGlobal(np.load, "x.npy"),
        CallsGlobal(__import__("codecs").encode, "abc", "rot13"),
        CallsGlobal(__import__("_codecs").encode, "abc", "rot13"),
    ],
)
def test_other_callables_are_refused(tmp_path, payload):
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([payload, b""], [True]), protocol=2))
    with pytest.raises(ValueError, match="refusing"):
        load_verification_bin(tmp_path / "evil.bin")


@pytest.mark.parametrize(
    "content, message",
    [
        (([b"a", b"b"],), "pair"),
        (([b"a", "text"], [True]), "image 1 is a str"),
        (([b"a", np.zeros(3, np.float32)], [True]), "image 1 is a ndarray float32"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", b"b"], [2]), "issame must be a list of bools"),
    ],
)
def test_wrong_contents_are_explained(tmp_path, content, message):
    (tmp_path / "bad.bin").write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(ValueError, match=message):
        load_verification_bin(tmp_path / "bad.bin")


class NumpyArray:
    """Pickles as numpy pickles an array, with the shape and dtype it is given."""

    def __init__(self, shape, dtype_code):
        self.shape, self.dtype_code = shape, dtype_code

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, self.shape, self.dtype_code))


def test_column_arrays_of_encoded_bytes_load(tmp_path):
    images = [np.frombuffer(face_jpeg(i), np.uint8).reshape(-1, 1) for i in range(4)]
    (tmp_path / "columns.bin").write_bytes(pickle.dumps((images, [True, False]), protocol=2))
    loaded, issame = load_verification_bin(tmp_path / "columns.bin")
    assert [bytes(i) for i in loaded] == [face_jpeg(i) for i in range(4)]
    assert decode_image(loaded[3]).shape == (112, 112, 3) and issame.tolist() == [True, False]


def test_fortran_ordered_image_is_refused(tmp_path):
    grid = np.asfortranarray(np.frombuffer(face_jpeg(0)[:12], np.uint8).reshape(3, 4))
    (tmp_path / "grid.bin").write_bytes(pickle.dumps(([grid, b"x"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"image 0 is a ndarray uint8; expected .* contiguous"):
        load_verification_bin(tmp_path / "grid.bin")


@pytest.mark.parametrize("protocol", [2, 4])
def test_array_larger_than_the_file_is_refused(tmp_path, protocol):
    huge = NumpyArray((9 * 2**40,), b"b")
    (tmp_path / "huge.bin").write_bytes(pickle.dumps(([huge, b"x"], [True]), protocol=protocol))
    size = (tmp_path / "huge.bin").stat().st_size
    with pytest.raises(ValueError, match=rf"huge\.bin.* {9 * 2**40} bytes .*only {size} bytes"):
        load_verification_bin(tmp_path / "huge.bin")


def test_byte_string_longer_than_the_file_is_refused(tmp_path):
    declared = 9 * 2**40
    data = pickle.PROTO + bytes([4]) + pickle.BINBYTES8 + declared.to_bytes(8, "little") + b"abc"
    (tmp_path / "long.bin").write_bytes(data)
    with pytest.raises(ValueError, match=rf"long\.bin.*{len(data)}-byte file.*{declared} bytes"):
        load_verification_bin(tmp_path / "long.bin")
