"""Decode, size and encode face images: libjpeg-turbo for JPEG, Pillow for everything else.

Training images are 112x112 RGB (the ArcFace template). An image of another size is scaled,
keeping its aspect ratio, until it covers 112x112, then cropped at the centre; grey images
get three equal channels.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from facescale.errors import InputError
from facescale.face import FACE_SIZE

JPEG_QUALITY = 95


class ImageDecodeError(InputError):
    """Bytes that are not a decodable image."""


def is_jpeg(buf: bytes | np.ndarray) -> bool:
    return bytes(buf[:3]) == b"\xff\xd8\xff"


def image_suffix(buf: bytes) -> str:
    """A file suffix for encoded image bytes, from their signature."""
    if is_jpeg(buf):
        return ".jpg"
    if buf[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    try:
        fmt = Image.open(io.BytesIO(buf)).format
    except (UnidentifiedImageError, OSError):
        return ".bin"
    return "." + (fmt or "bin").lower()


def decode_image(buf: bytes | np.ndarray) -> np.ndarray:
    """Decode JPEG/PNG/any Pillow format to an HxWx3 uint8 RGB array."""
    data = buf.tobytes() if isinstance(buf, np.ndarray) else bytes(buf)
    try:
        if is_jpeg(data) and simplejpeg.decode_jpeg_header(data)[2] != "CMYK":
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (ValueError, OSError, UnidentifiedImageError) as err:
        head = data[:8].hex()
        raise ImageDecodeError(
            f"not a decodable image ({len(data)} bytes, starts {head}): {err}"
        ) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grey and palette images are expanded)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"{path}: cannot be read as an image ({err})") from None


def fit_face(image: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """Scale to cover ``size`` x ``size`` keeping the aspect ratio, then crop the centre."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an HxWx3 uint8 RGB array as JPEG."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB")


def face_bytes(
    data: bytes,
    quality: int = JPEG_QUALITY,
    align: Callable[[np.ndarray], np.ndarray] | None = None,
) -> bytes:
    """Encoded bytes of a 112x112 face: ``data`` itself when it already is one, else re-encoded
    after :func:`fit_face`; with ``align`` (an image to its aligned face) every image is
    aligned and re-encoded."""
    image = decode_image(data)
    if align is not None:
        return encode_jpeg(align(image), quality)
    if image.shape[:2] == (FACE_SIZE, FACE_SIZE) and image_suffix(data) in (".jpg", ".png"):
        return data
    return encode_jpeg(fit_face(image), quality)
