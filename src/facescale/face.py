"""The face crop every model sees: its size and the pixel scaling of the model input.

Faces are aligned RGB crops of ``FACE_SIZE`` x ``FACE_SIZE`` pixels (the ArcFace template);
training, evaluation, export and embedding all feed the backbone the same scaled pixels.
"""

from __future__ import annotations

import numpy as np
import torch

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
