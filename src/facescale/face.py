"""The face crop every model sees: its size, the template it is aligned to, and the pixel
scaling of the model input.

Faces are aligned RGB crops of ``FACE_SIZE`` x ``FACE_SIZE`` pixels (the ArcFace template);
training, evaluation, export and embedding all feed the backbone the same scaled pixels.
Landmarks are (x, y) pixel coordinates of the left eye, right eye, nose tip, left and right
mouth corners, pixel centres at integers (as face detectors and OpenCV report them). The
warp samples bilinearly and fills outside the source image with black, which is what
``cv2.warpAffine`` does with the same matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FACE_SIZE = 112

# One float32 step below 1/127.5, so that 255 maps to 1 - 1.2e-7 and never past 1.
PIXEL_SCALE = float(np.nextafter(np.float32(1 / 127.5), np.float32(0)))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[B, 3, H, W]`` -> float32 in [-1, 1], as arcface_torch's
    ``Normalize(mean=0.5, std=0.5)`` scales them.

    ``x * scale - 1`` in one pass over the converted pixels; within 1.2e-7 of the exact value.
    """
    pixels = images.to(torch.float32)
    minus_one = torch.tensor(-1.0, device=images.device)
    return torch.add(minus_one, pixels, alpha=PIXEL_SCALE, out=pixels)


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
