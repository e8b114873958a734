"""Image files as model inputs: aligned by given landmarks (:func:`facescale.face.align_face`),
or, without them, an image of another size fitted the way ``facescale convert folder2rec``
fits it (scaled to cover, centre-cropped).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from facescale.data.image import fit_face, read_rgb
from facescale.errors import InputError
from facescale.face import FACE_SIZE, align_face

log = logging.getLogger("facescale.eval")


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
