"""Training augmentations on uint8 HxWx3 images, driven by an explicit random generator.

``flip`` is arcface_torch's default (random horizontal flip), done while the image is copied
into the CxHxW batch. ``strong`` adds, each with its own probability, a down-up resize, a
Gaussian blur, a hue/saturation/value jitter and a grey conversion: useful on large datasets.
The ``random_crop`` and ``random_rotation`` keys, apart from the mode, zoom and shift each image
by a random fraction of its side and turn it by a random angle: on small sets of faces not
aligned to a template, they show the model each face at many scales, places and tilts.
``random_erase`` hides a random rectangle of some images behind noise, as a hand, glasses or
another head hide part of a face. :class:`Augmentation` applies the keys together, in one
order. The generator is seeded per batch, so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

DOWN_UP_P, DOWN_UP_SCALE = 0.2, (0.4, 1.0)
BLUR_P, BLUR_RADIUS = 0.1, (0.5, 1.5)
HSV_P, HUE_SHIFT, SAT_VAL_SCALE = 0.5, 0.05, (0.7, 1.3)
GREY_P = 0.1
# an erased rectangle covers 2 to 40 % of the image, its height 1/3 to 3 times its width
ERASE_AREA, ERASE_ASPECT = (0.02, 0.4), 3.0


def reframe(
    image: np.ndarray, zoom: float, dx: float, dy: float, degrees: float = 0.0
) -> np.ndarray:
    """The image turned ``degrees`` clockwise and zoomed by ``zoom``, both about its centre,
    then moved ``dx`` right and ``dy`` down (pixels); black where nothing of the image lands."""
    height, width = image.shape[:2]
    cx, cy = width / 2, height / 2  # PIL samples pixel centres at half-integers
    # the output pixel (x, y) reads the input at the centre plus (x - cx - dx, y - cy - dy)
    # turned back by the angle and divided by the zoom: one resampling for all three
    turn = math.radians(degrees)
    cos, sin = math.cos(turn), math.sin(turn)
    ox, oy = cx + dx, cy + dy
    inverse = (
        *(cos / zoom, sin / zoom, cx - (cos * ox + sin * oy) / zoom),
        *(-sin / zoom, cos / zoom, cy - (cos * oy - sin * ox) / zoom),
    )
    moved = Image.fromarray(image).transform((width, height), Image.AFFINE, inverse, Image.BILINEAR)
    return np.asarray(moved)


def random_reframe(
    image: np.ndarray, extent: float, degrees: float, rng: np.random.Generator
) -> np.ndarray:
    """Zoom by a factor in [1 - extent, 1 + extent], shift by up to ``extent`` of the side in
    each direction and turn by up to ``degrees`` either way, drawn per image (a draw only
    for what is on, so a run without rotation draws as it always did)."""
    dz, sx, sy = rng.uniform(-extent, extent, size=3) if extent else (0.0, 0.0, 0.0)
    angle = rng.uniform(-degrees, degrees) if degrees else 0.0
    height, width = image.shape[:2]
    return reframe(image, 1 + dz, sx * width, sy * height, angle)


def random_erase(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of the image with one rectangle of random area, shape and place filled with
    uniform noise."""
    height, width = image.shape[:2]
    area = rng.uniform(*ERASE_AREA) * height * width
    aspect = math.exp(rng.uniform(-math.log(ERASE_ASPECT), math.log(ERASE_ASPECT)))
    h = min(height, max(1, round(math.sqrt(area * aspect))))
    w = min(width, max(1, round(math.sqrt(area / aspect))))
    top, left = rng.integers(height - h + 1), rng.integers(width - w + 1)
    out = image.copy()
    out[top : top + h, left : left + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return out


def draw_flips(count: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Which images of a batch to mirror: each with probability 1/2, none for mode 'none'."""
    if mode == "none":
        return np.zeros(count, dtype=bool)
    return rng.random(count) < 0.5


def place_chw(out: np.ndarray, image: np.ndarray, flip: bool) -> None:
    """Copy an HxWx3 image into a 3xHxW slot, mirrored left-right when ``flip``."""
    chw = image.transpose(2, 0, 1)
    out[...] = chw[:, :, ::-1] if flip else chw


def down_up(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shrink by a random factor and scale back: the blur of a low-resolution camera."""
    height, width = image.shape[:2]
    scale = rng.uniform(*DOWN_UP_SCALE)
    small = Image.fromarray(image).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR
    )
    return np.asarray(small.resize((width, height), Image.BILINEAR))


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(*BLUR_RADIUS)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def hsv_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift the hue and scale saturation and value by random amounts."""
    hsv = np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.float32)
    hsv[..., 0] = (hsv[..., 0] + 256 * rng.uniform(-HUE_SHIFT, HUE_SHIFT)) % 256
    hsv[..., 1:] *= rng.uniform(*SAT_VAL_SCALE, size=2)
    hsv = np.clip(hsv + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def grey(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    luma = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(luma[..., None], 3, axis=2)


STRONG_STEPS = ((DOWN_UP_P, down_up), (BLUR_P, blur), (HSV_P, hsv_jitter), (GREY_P, grey))


def strong_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply each strong step with its probability, in a fixed order."""
    for p, step in STRONG_STEPS:
        if rng.random() < p:
            image = step(image, rng)
    return image


@dataclass(frozen=True)
class Augmentation:
    """What is done to each training image: the config's ``augment`` (the mode), and
    ``random_crop``, ``random_rotation`` and ``random_erase``; a step that is off draws
    nothing, so adding a key leaves the draws of runs without it as they were."""

    mode: str = "flip"
    crop: float = 0.0
    rotation: float = 0.0
    erase: float = 0.0  # the probability that an image has a rectangle erased

    @classmethod
    def of(cls, cfg: Any) -> Augmentation:
        return cls(cfg.augment, cfg.random_crop, cfg.random_rotation, cfg.random_erase)

    def flips(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Which of ``count`` images to mirror (:func:`draw_flips`)."""
        return draw_flips(count, self.mode, rng)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The image augmented: strong steps, then zoom, shift and turn, then erasing."""
        if self.mode == "strong":
            image = strong_augment(image, rng)
        if self.crop or self.rotation:
            image = random_reframe(image, self.crop, self.rotation, rng)
        if self.erase and rng.random() < self.erase:
            image = random_erase(image, rng)
        return image
