"""Procedurally drawn face-like images: a fixed look per identity, varied pose, light and noise.

Each identity is a set of shape and colour parameters (face outline, hair, eyes, brows,
nose, mouth, beard, a mark); each image of it redraws those under a random head pose,
expression, lighting, background and sensor noise. The images are 112x112 RGB uint8, the
size face models take, and need no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facescale.face import FACE_SIZE


@dataclass(frozen=True)
class Identity:
    """The per-person parameters that stay fixed across that person's images."""

    skin: np.ndarray
    hair: np.ndarray
    lips: np.ndarray
    iris: np.ndarray
    face_rx: float
    face_ry: float
    hairline: float
    hair_volume: float
    eye_y: float
    eye_dx: float
    eye_rx: float
    eye_ry: float
    brow_gap: float
    brow_tilt: float
    brow_width: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    mouth_h: float
    beard: float
    mark: tuple[float, float, float]


def make_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's parameters."""
    tone = rng.uniform(0.25, 0.95)
    skin = np.array([0.95, 0.78, 0.62]) * tone + rng.normal(0, 0.04, 3)
    hair = rng.choice(
        [[0.08, 0.06, 0.05], [0.35, 0.22, 0.1], [0.75, 0.6, 0.3], [0.6, 0.6, 0.6], [0.5, 0.15, 0.1]]
    ) + rng.normal(0, 0.03, 3)
    has_mark = rng.random() < 0.5
    return Identity(
        skin=np.clip(skin, 0, 1),
        hair=np.clip(hair, 0, 1),
        lips=np.clip(skin * np.array([1.0, 0.6, 0.6]) + rng.normal(0, 0.03, 3), 0, 1),
        iris=np.clip(rng.choice([[0.3, 0.2, 0.1], [0.2, 0.4, 0.6], [0.3, 0.5, 0.3]]), 0, 1),
        face_rx=rng.uniform(0.52, 0.72),
        face_ry=rng.uniform(0.68, 0.86),
        hairline=rng.uniform(-0.62, -0.38),
        hair_volume=rng.uniform(1.02, 1.2),
        eye_y=rng.uniform(-0.22, -0.05),
        eye_dx=rng.uniform(0.18, 0.34),
        eye_rx=rng.uniform(0.07, 0.13),
        eye_ry=rng.uniform(0.035, 0.065),
        brow_gap=rng.uniform(0.09, 0.18),
        brow_tilt=rng.uniform(-0.35, 0.35),
        brow_width=rng.uniform(0.015, 0.04),
        nose_len=rng.uniform(0.12, 0.3),
        nose_w=rng.uniform(0.05, 0.11),
        mouth_y=rng.uniform(0.3, 0.48),
        mouth_w=rng.uniform(0.13, 0.3),
        mouth_h=rng.uniform(0.025, 0.06),
        beard=rng.uniform(0.3, 0.8) if rng.random() < 0.3 else 0.0,
        mark=(rng.uniform(-0.4, 0.4), rng.uniform(-0.1, 0.5), 0.035) if has_mark else (0, 0, 0),
    )


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape whose implicit distance is < 1 inside, anti-aliased."""
    return 1.0 / (1.0 + np.exp(np.clip((distance - 1.0) / edge, -30, 30)))


def _step(signed: np.ndarray, width: float) -> np.ndarray:
    """A smooth 0 -> 1 transition where ``signed`` crosses zero."""
    return 1.0 / (1.0 + np.exp(np.clip(-signed / width, -30, 30)))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float):
    return np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    img *= 1.0 - mask[..., None]
    img += mask[..., None] * color


def render(person: Identity, rng: np.random.Generator) -> np.ndarray:
    """One 112x112x3 uint8 image of ``person`` under a random pose, expression and light."""
    grid = (np.arange(FACE_SIZE) + 0.5) / FACE_SIZE * 2 - 1
    v, u = np.meshgrid(grid, grid, indexing="ij")
    angle = rng.normal(0, 0.12)
    scale = rng.uniform(0.9, 1.1)
    tx, ty = rng.normal(0, 0.04, 2)
    yaw = rng.normal(0, 0.12)
    cos, sin = np.cos(angle), np.sin(angle)
    x = (cos * (u - tx) + sin * (v - ty)) / scale
    y = (-sin * (u - tx) + cos * (v - ty)) / scale
    x_feat = x - yaw * (1 - y**2) * 0.5  # features slide sideways as the head turns
    edge = 0.06

    bg = rng.uniform(0.1, 0.9, 3)
    bg2 = rng.uniform(0.1, 0.9, 3)
    img = bg + (bg2 - bg) * ((v + 1) / 2)[..., None]
    p = person
    hair = _soft(_ellipse(x, y, 0, -0.05, p.face_rx * p.hair_volume, 0.95), edge)
    _paint(img, hair * _step(0.15 - y, 0.03), p.hair)
    face = _soft(_ellipse(x, y, 0, 0.05, p.face_rx * (1 - abs(yaw) * 0.3), p.face_ry), edge)
    face *= _step(y - p.hairline, 0.02)  # forehead ends where the hair begins
    _paint(img, face, p.skin)
    if p.beard:
        chin = _soft(_ellipse(x_feat, y, 0, 0.5, p.face_rx * 0.85, 0.38), edge) * face
        _paint(img, chin * _step(y - p.mouth_y + 0.05, 0.02) * p.beard, p.hair)
    mx, my, mr = p.mark
    if mr:
        _paint(img, _soft(_ellipse(x_feat, y, mx, my, mr, mr), 0.1) * face, p.skin * 0.45)

    blink = rng.uniform(0.4, 1.0) if rng.random() < 0.15 else 1.0
    for side in (-1, 1):
        ex = side * p.eye_dx
        white = _soft(_ellipse(x_feat, y, ex, p.eye_y, p.eye_rx, p.eye_ry * blink), edge)
        _paint(img, white, np.array([0.95, 0.95, 0.92]))
        look = rng.normal(0, 0.015)
        iris = _soft(_ellipse(x_feat, y, ex + look, p.eye_y, p.eye_ry * 0.9, p.eye_ry * 0.9), edge)
        _paint(img, iris * white, p.iris)
        by = p.eye_y - p.brow_gap
        tilt = side * p.brow_tilt * (x_feat - ex)
        brow = _soft(_ellipse(x_feat, y - tilt, ex, by, p.eye_rx * 1.3, p.brow_width), edge)
        _paint(img, brow, p.hair * 0.8)

    nose_top = p.eye_y + 0.05
    nose = _soft(_ellipse(x_feat, y, 0, nose_top + p.nose_len / 2, p.nose_w, p.nose_len / 2), 0.25)
    _paint(img, nose * 0.45, p.skin * 0.7)
    smile = rng.normal(0, 0.04)
    mouth_y = p.mouth_y + smile * (x_feat / p.mouth_w) ** 2
    mouth = _soft(
        _ellipse(x_feat, y - mouth_y + p.mouth_y, 0, p.mouth_y, p.mouth_w, p.mouth_h), edge
    )
    _paint(img, mouth, p.lips)

    light_dir = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.7, 1.2) * (
        1 + rng.uniform(0, 0.35) * (np.cos(light_dir) * u + np.sin(light_dir) * v)
    )
    img = img * light[..., None] * rng.uniform(0.9, 1.1, 3)
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def identities(count: int, seed: int) -> list[Identity]:
    """``count`` people, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [make_identity(rng) for _ in range(count)]
