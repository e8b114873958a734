"""Decoding, sizing, augmentation and normalisation of face images, against references."""

import io

import numpy as np
import pytest
from data_helpers import face_jpeg
from PIL import Image

from facescale.data import decode_image
from facescale.data.augment import (
    ERASE_AREA,
    Augmentation,
    draw_flips,
    grey,
    place_chw,
    random_erase,
    random_reframe,
    reframe,
    strong_augment,
)
from facescale.data.image import ImageDecodeError, encode_jpeg, face_bytes, fit_face


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def random_image(mode: str, size=(112, 112), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode)


@pytest.mark.parametrize(
    "data",
    [
        encoded(random_image("RGB"), "JPEG", quality=95),
        encoded(random_image("L"), "JPEG"),
        encoded(random_image("CMYK"), "JPEG"),
        encoded(random_image("RGB", (92, 112)), "PNG"),
        encoded(random_image("L", (92, 112)), "PPM"),
    ],
    ids=["jpeg", "grey-jpeg", "cmyk-jpeg", "png", "pgm"],
)
def test_decode_equals_pillow(data):
    got = decode_image(data)
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3
    np.testing.assert_array_equal(got, pil_rgb(data))
    np.testing.assert_array_equal(decode_image(np.frombuffer(data, np.uint8)), got)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0garbage", b"not an image"])
def test_undecodable_bytes_are_an_error(data):
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(data)


def test_fit_face_keeps_aspect_and_centre():
    image = np.zeros((112, 92, 3), np.uint8)
    image[:, 46:] = 255  # right half white
    fitted = fit_face(image)
    assert fitted.shape == (112, 112, 3)
    assert (fitted[:, :55] < 10).all() and (fitted[:, 57:] > 245).all()
    tall = np.full((192, 168, 3), 77, np.uint8)
    assert (fit_face(tall) == 77).all()
    square = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    assert fit_face(square) is square


def test_face_bytes_keeps_faces_and_fits_others():
    jpeg = face_jpeg(0)
    assert face_bytes(jpeg) is jpeg
    small = encoded(random_image("L", (92, 112)), "PNG")
    assert decode_image(face_bytes(small)).shape == (112, 112, 3)


def test_place_chw_transposes_and_mirrors():
    image = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = np.empty((2, 3, 112, 112), np.uint8)
    place_chw(out[0], image, False)
    place_chw(out[1], image, True)
    for c in range(3):
        np.testing.assert_array_equal(out[0, c], image[:, :, c])
        np.testing.assert_array_equal(out[1, c], np.fliplr(image[:, :, c]))


def test_flips_are_drawn_per_image_and_reproducible():
    flips = draw_flips(200, "flip", np.random.default_rng(5))
    np.testing.assert_array_equal(flips, draw_flips(200, "strong", np.random.default_rng(5)))
    assert 60 < flips.sum() < 140
    assert not draw_flips(200, "none", np.random.default_rng(5)).any()


def test_strong_augmentation_is_reproducible_and_varied():
    base = [decode_image(face_jpeg(i)) for i in range(32)]
    runs = [
        [strong_augment(img, rng) for img in base] for rng in map(np.random.default_rng, (3, 3, 4))
    ]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))
    assert all(a.shape == (112, 112, 3) and a.dtype == np.uint8 for a in runs[0])
    changed = sum(not np.array_equal(a, b) for a, b in zip(runs[0], base, strict=True))
    assert 0 < changed < 32  # some images got a strong step, not all


def bilinear_reframe(
    image: np.ndarray, zoom: float, dx: float, dy: float, degrees: float = 0.0
) -> np.ndarray:
    """Float64 reference: each output pixel centre moved back by (dx, dy), turned back by
    ``degrees``, divided by ``zoom`` about the centre and sampled bilinearly from its four
    nearest input pixels; NaN where those are not all inside the image."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    u, v = (xs - w / 2 - dx) / zoom, (ys - h / 2 - dy) / zoom
    turn = np.deg2rad(degrees)  # clockwise on screen, where y points down
    sx = np.cos(turn) * u + np.sin(turn) * v + w / 2 - 0.5  # input pixel coordinates
    sy = -np.sin(turn) * u + np.cos(turn) * v + h / 2 - 0.5  # (centres at integers)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def at(y, x):  # clipped indices: such samples are masked below
        return image[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)].astype(np.float64)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    return np.where(inside[..., None], top * (1 - fy) + bottom * fy, np.nan)


def test_reframe_moves_whole_pixels_exactly():
    image = decode_image(face_jpeg(1))
    moved = reframe(image, 1.0, 7, -5)  # 7 right, 5 up
    expected = np.zeros_like(image)
    expected[:-5, 7:] = image[5:, :-7]
    np.testing.assert_array_equal(moved, expected)


def test_a_quarter_turn_is_clockwise():
    image = decode_image(face_jpeg(2))
    turned = reframe(image, 1.0, 0.0, 0.0, 90.0).astype(int)  # the top row goes right
    # within one uint8 step: the sine and cosine of 90 degrees are not exactly 1 and 0
    assert np.abs(turned - np.rot90(image, k=-1)).max() <= 1


@pytest.mark.parametrize(
    "zoom, dx, dy, degrees",
    [
        (1.13, 0.0, 0.0, 0.0),
        (0.87, 3.4, -8.25, 0.0),
        (1.3, -6.5, 2.0, 0.0),
        (1.0, 0.0, 0.0, 13.0),
        (0.91, 4.5, -2.25, -27.5),
    ],
)
def test_reframe_matches_a_float64_bilinear_reference(zoom, dx, dy, degrees):
    image = decode_image(face_jpeg(4))
    got = reframe(image, zoom, dx, dy, degrees).astype(np.float64)
    reference = bilinear_reframe(image, zoom, dx, dy, degrees)
    inside = ~np.isnan(reference)  # how the image's edge meets black is PIL's own choice
    assert inside.mean() > 0.5
    assert np.abs(got - reference)[inside].max() <= 1 + 1e-9  # one uint8 step: PIL rounds down


@pytest.mark.parametrize("extent, degrees", [(0.1, 0.0), (0.0, 15.0), (0.1, 15.0)])
def test_random_reframe_is_reproducible_varied_and_bounded(extent, degrees):
    image = decode_image(face_jpeg(5))
    runs = [
        [random_reframe(image, extent, degrees, rng) for _ in range(8)]
        for rng in map(np.random.default_rng, (1, 1))
    ]
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    assert len({a.tobytes() for a in runs[0]}) == 8
    for out in runs[0]:  # at most 10% zoom and shift: the centre still shows the face
        assert out.shape == image.shape and out.dtype == np.uint8
        assert out[40:72, 40:72].min(axis=(0, 1)).max() > 0


def test_random_reframe_without_rotation_draws_as_zoom_and_shift_alone():
    """Runs that zoom and shift only (every run before rotation existed) draw what they drew."""
    image = decode_image(face_jpeg(6))
    rng, again = np.random.default_rng(9), np.random.default_rng(9)
    got = random_reframe(image, 0.2, 0.0, rng)
    dz, sx, sy = again.uniform(-0.2, 0.2, size=3)
    np.testing.assert_array_equal(got, reframe(image, 1 + dz, sx * 112, sy * 112))
    assert rng.random() == again.random()  # nothing more drawn


def test_random_erase_fills_one_rectangle_of_bounded_area_with_noise():
    image = decode_image(face_jpeg(7))
    image.setflags(write=False)  # as PIL gives it: erasing must copy
    areas = []
    for seed in range(40):
        out = random_erase(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        rows, cols = np.nonzero((out != image).any(axis=2))
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = out[top:bottom, left:right]
        # noise: a pixel of the box keeps the image's value only by chance (1 in 256 a channel)
        assert (box != image[top:bottom, left:right]).any(axis=2).mean() > 0.95
        assert np.unique(box).size > 64
        areas.append((bottom - top) * (right - left) / image.shape[0] / image.shape[1])
        assert 1 / 3 - 0.05 <= (bottom - top) / (right - left) <= 3 + 0.5
    lo, hi = ERASE_AREA
    assert lo * 0.8 <= min(areas) and max(areas) <= hi * 1.1 and max(areas) - min(areas) > 0.1
    again = random_erase(image, np.random.default_rng(39))
    np.testing.assert_array_equal(again, out)


@pytest.mark.parametrize("probability", [0.0, 0.3, 1.0])
def test_augmentation_erases_the_share_of_images_it_is_given(probability):
    image = decode_image(face_jpeg(8))
    rng = np.random.default_rng(4)
    erased = [
        not np.array_equal(Augmentation("none", erase=probability)(image, rng), image)
        for _ in range(400)
    ]
    assert abs(np.mean(erased) - probability) < 0.07


def test_augmentation_without_erasing_draws_as_before():
    """Runs without ``random_erase`` (every run before it existed) draw what they drew."""
    image = decode_image(face_jpeg(9))
    rng, again = np.random.default_rng(2), np.random.default_rng(2)
    got = Augmentation("strong", crop=0.1, rotation=5.0)(image, rng)
    expected = random_reframe(strong_augment(image, again), 0.1, 5.0, again)
    np.testing.assert_array_equal(got, expected)
    assert rng.random() == again.random()  # nothing more drawn


def test_grey_and_strong_steps_keep_the_format():
    image = decode_image(face_jpeg(3))
    g = grey(image, np.random.default_rng(0))
    assert (
        g.shape == image.shape and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    )
    out = strong_augment(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8


def test_encode_jpeg_round_trip_is_close():
    image = decode_image(face_jpeg(2))
    again = decode_image(encode_jpeg(image, quality=95))
    assert np.abs(again.astype(int) - image).mean() < 3
