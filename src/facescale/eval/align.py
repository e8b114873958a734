"""Face alignment: five landmarks to the 112x112 ArcFace template by a similarity transform.

Landmarks are (x, y) pixel coordinates of the left eye, right eye, nose tip, left and right
mouth corners, pixel centres at integers (as face detectors and OpenCV report them). The
warp samples bilinearly and fills outside the source image with black, which is what
``cv2.warpAffine`` does with the same matrix. Without landmarks an image of another size is
fitted the way ``facescale convert folder2rec`` fits it (scaled to cover, centre-cropped).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from facescale.data.image import fit_face
from facescale.errors import InputError
from facescale.face import FACE_SIZE

log = logging.getLogger("facescale.eval")

# Where arcface_torch's training crops have the five landmarks, in 112x112 pixels.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of rotation, uniform scale and shift that maps ``source`` points onto
    ``target`` points ``[K, 2]`` with the least squared error (no reflection)."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2:
        raise ValueError(f"landmarks {list(source.shape)} and template {list(target.shape)} differ")
    # x' = a x - b y + tx and y' = b x + a y + ty are linear in (a, b, tx, ty).
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.empty((2 * len(source), 4))
    design[0::2] = np.stack([x, -y, ones, zeros], axis=1)
    design[1::2] = np.stack([y, x, zeros, ones], axis=1)
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """``out[y, x] = image`` at ``matrix^-1 (x, y)``, bilinear, black outside; HxWxC uint8 or
    HxW float32 in, same kind out."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    # Pillow samples pixel centres at +0.5; shift so integer coordinates are pixel centres.
    linear, shift = inverse[:, :2], inverse[:, 2]
    shift = shift + 0.5 - linear @ np.array([0.5, 0.5])
    coefficients = (*linear[0], shift[0], *linear[1], shift[1])
    warped = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """Warp an HxWx3 uint8 image so its five ``landmarks`` land on the ArcFace template."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / FACE_SIZE))
    return warp_affine(image, matrix, size)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grey and palette images are expanded)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"{path}: cannot be read as an image ({err})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header alone."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"{path}: cannot be read as an image ({err})") from None


class FaceCrops(torch.utils.data.Dataset):
    """Image files as uint8 ``[3, 112, 112]`` tensors, aligned when landmarks are given.

    Without landmarks an image that is not a 112x112 crop is scaled to cover 112x112 and
    cropped at the centre, with one warning for all such images: unaligned faces embed worse.
    """

    def __init__(self, paths: Sequence[str | Path], landmarks: np.ndarray | None = None) -> None:
        if landmarks is not None and len(landmarks) != len(paths):
            raise InputError(f"{len(landmarks)} landmark rows for {len(paths)} images")
        self.paths = [Path(p) for p in paths]
        self.landmarks = landmarks
        self.unaligned: list[Path] = []
        if landmarks is None:
            self.unaligned = [p for p in self.paths if image_size(p) != (FACE_SIZE, FACE_SIZE)]
        if self.unaligned:
            log.warning(
                "%d of %d images are not %dx%d crops and no landmarks were given (first: %s): "
                "each is scaled to cover %dx%d and cropped at the centre, as `facescale "
                "convert folder2rec` does; faces that are not aligned to the ArcFace template "
                "embed worse, so give five landmarks per image where you have them",
                len(self.unaligned),
                len(self.paths),
                FACE_SIZE,
                FACE_SIZE,
                self.unaligned[0],
                FACE_SIZE,
                FACE_SIZE,
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = read_rgb(self.paths[index])
        if self.landmarks is not None:
            image = align_face(image, self.landmarks[index])
        else:
            image = fit_face(image)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
