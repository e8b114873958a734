"""Verification sets in InsightFace's ``.bin`` form, read without running untrusted code.

A ``.bin`` (lfw.bin, cfp_fp.bin, agedb_30.bin) is a pickle of ``(images, issame)``: a list of
encoded images (``bytes``, or uint8 numpy arrays of those bytes, 1-D or ``(n, 1)``) and one
bool per pair of consecutive images. Pickles can call any importable function while loading, so
the reader accepts only the few constructors such files need, no array larger than the file,
and checks the result's shape.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from facescale.errors import InputError

BIN_PROTOCOL = 4


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes with protocol 2, for latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    """numpy's scalar constructor, limited to plain numeric and bool dtypes."""
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buf: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array constructor, limited to non-object dtypes."""
    if np.dtype(dtype).hasobject:
        raise pickle.UnpicklingError("refusing an object array")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: only ``_reconstruct`` takes it, nothing may call it."""


NDARRAY = _NdarrayName()
CORE_MODULES = ("numpy.core", "numpy._core")
ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): np.dtype,
}
for _core in CORE_MODULES:
    ALLOWED[(f"{_core}.multiarray", "scalar")] = _scalar
    ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the names in ALLOWED, and builds no array larger than ``max_bytes``.

    Anything else is refused before it can run; the size bound keeps a few corrupt bytes from
    declaring an array that does not fit in memory.
    """

    def __init__(self, file: BinaryIO, max_bytes: int) -> None:
        super().__init__(file, encoding="bytes")
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in (f"{c}.multiarray" for c in CORE_MODULES):
            return self._reconstruct
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a verification .bin holds only images and bools"
            ) from None

    def _reconstruct(self, cls: Any, shape: Any, dtype_code: bytes) -> np.ndarray:
        """numpy's ndarray constructor used by pickle, limited to ndarray and ``max_bytes``."""
        if cls is not NDARRAY:
            raise pickle.UnpicklingError(f"refusing to build {cls!r}")
        dtype = np.dtype(dtype_code)
        declared = math.prod(shape) * dtype.itemsize
        if declared > self.max_bytes:
            raise pickle.UnpicklingError(
                f"an array of shape {tuple(shape)} {dtype} declares {declared} bytes but the "
                f"file holds only {self.max_bytes} bytes; the file is corrupt"
            )
        return np.ndarray.__new__(np.ndarray, shape, dtype)


def _as_image(item: Any, path: Path, i: int) -> bytes | np.ndarray:
    """An image's encoded bytes: ``bytes`` as they are, a contiguous uint8 array flattened."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.flags.c_contiguous:
        return item.reshape(-1)
    raise InputError(
        f"{path}: image {i} is a {type(item).__name__} "
        f"{getattr(item, 'dtype', '')}; expected encoded image bytes or a contiguous uint8 array"
    )


def _overlong_length(data: bytes) -> str:
    """Why a pickle asked for more memory than there is: the length that runs past its end."""
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError as err:
        return str(err)
    return "it asks for more memory than this machine has"


def load_verification_bin(path: str | Path) -> tuple[list[bytes | np.ndarray], np.ndarray]:
    """Encoded images and the bool per consecutive pair, from an InsightFace ``.bin``."""
    path = Path(path)
    with open(path, "rb") as f:
        size = path.stat().st_size
        try:
            data = SafeUnpickler(f, max_bytes=size).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise InputError(f"{path}: not a verification .bin: {err}") from None
        except MemoryError:
            raise InputError(
                f"{path}: not a verification .bin: a length inside this {size}-byte file runs "
                f"past its end ({_overlong_length(path.read_bytes())})"
            ) from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputError(f"{path}: expected a pickled (images, issame) pair")
    images, issame = data
    images = [_as_image(item, path, i) for i, item in enumerate(images)]
    flags = np.asarray(issame)
    if flags.ndim != 1 or flags.dtype.kind not in "bi" or not np.isin(flags, (0, 1)).all():
        raise InputError(f"{path}: issame must be a list of bools")
    if len(images) != 2 * len(flags):
        raise InputError(
            f"{path}: {len(images)} images for {len(flags)} pairs; expected two images per pair"
        )
    return images, flags.astype(bool)


def write_verification_bin(
    path: str | Path, images: Sequence[bytes | np.ndarray], issame: Sequence[bool]
) -> None:
    """Write ``(images as bytes, issame as bools)`` the way InsightFace's readers expect."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; expected two per pair")
    payload = (
        [bytes(b) if not isinstance(b, np.ndarray) else b.tobytes() for b in images],
        [bool(s) for s in issame],
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pickle.dump(payload, buf, protocol=BIN_PROTOCOL)
    Path(path).write_bytes(buf.getvalue())
