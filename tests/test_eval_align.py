"""Five-point alignment: the similarity fit, the warp's pixel convention, whole-face recovery,
and the fitting of images given without landmarks."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facescale.data.image import fit_face
from facescale.eval.align import FaceCrops
from facescale.face import ARCFACE_TEMPLATE, align_face, similarity_transform, warp_affine

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def similarity(scale, angle, shift):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def umeyama(source, target):
    """Umeyama's closed form for the least-squares similarity, written independently."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    u, d, vt = np.linalg.svd(t.T @ s / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / s.var(0).sum()
    return np.hstack([scale * rotation, (mu_t - scale * rotation @ mu_s)[:, None]])


def test_exact_points_give_the_exact_transform():
    matrix = similarity(1.7, -0.4, (12.5, -3.0))
    fitted = similarity_transform(ARCFACE_TEMPLATE, apply(matrix, ARCFACE_TEMPLATE))
    np.testing.assert_allclose(fitted, matrix, atol=1e-10)


def test_noisy_points_give_the_least_squares_similarity():
    rng = np.random.default_rng(0)
    for _ in range(10):
        landmarks = rng.uniform(0, 250, (5, 2))
        np.testing.assert_allclose(
            similarity_transform(landmarks, ARCFACE_TEMPLATE),
            umeyama(landmarks, ARCFACE_TEMPLATE),
            atol=1e-9,
        )


def test_warp_samples_at_pixel_centres_like_opencv():
    # Bilinear sampling reproduces a linear ramp exactly, so any half-pixel shift would show.
    height, width = 150, 170
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = (0.7 * cols + 0.3 * rows + 5).astype(np.float32)
    matrix = similarity(0.8, 0.3, (10.0, -20.0))
    out = warp_affine(ramp, matrix, 112)
    out_rows, out_cols = np.mgrid[0:112, 0:112].astype(np.float64)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    source = apply(inverse, np.stack([out_cols.ravel(), out_rows.ravel()], axis=1))
    expected = (0.7 * source[:, 0] + 0.3 * source[:, 1] + 5).reshape(112, 112)
    inside = ((source >= 1) & (source <= [width - 2, height - 2])).all(axis=1).reshape(112, 112)
    outside = ((source < -1) | (source > [width, height])).any(axis=1).reshape(112, 112)
    assert inside.sum() > 5000 and outside.sum() > 300
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3)
    assert (out[outside] == 0).all()  # black beyond the source image


def smooth_face(seed):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((112, 112), Image.Resampling.BICUBIC))


def test_align_face_undoes_a_similarity_of_the_crop():
    face = smooth_face(1)
    placed = similarity(1.6, 0.35, (60.0, 20.0))
    loose = warp_affine(face, placed, 260)
    landmarks = apply(placed, ARCFACE_TEMPLATE)
    aligned = align_face(loose, landmarks)
    error = np.abs(aligned.astype(int) - face.astype(int))[4:-4, 4:-4]
    assert error.mean() < 3


def write_png(path, image):
    Image.fromarray(image).save(path)
    return path


def test_face_crops_align_or_fit_to_112_with_a_warning(tmp_path, caplog):
    face = smooth_face(2)
    placed = similarity(1.3, -0.2, (30.0, 25.0))
    loose = write_png(tmp_path / "loose.png", warp_affine(face, placed, 200))
    wide = write_png(tmp_path / "wide.png", np.tile(face, (2, 3, 1)))
    crop = write_png(tmp_path / "crop.png", face)
    landmarks = np.stack([apply(placed, ARCFACE_TEMPLATE), ARCFACE_TEMPLATE])
    with caplog.at_level(logging.WARNING, logger="facescale.eval"):
        aligned = FaceCrops([loose, crop], landmarks)
        assert [tuple(aligned[i].shape) for i in range(2)] == [(3, 112, 112)] * 2
        np.testing.assert_array_equal(FaceCrops([crop])[0].numpy(), face.transpose(2, 0, 1))
        assert not caplog.records  # aligned or already 112x112: nothing to say
        fitted = FaceCrops([crop, loose, wide])
    assert fitted.unaligned == [loose, wide]
    (warning,) = caplog.records
    assert "2 of 3 images are not 112x112" in warning.message and "embed worse" in warning.message
    for index, path in ((1, loose), (2, wide)):
        expected = fit_face(np.asarray(Image.open(path).convert("RGB")))
        np.testing.assert_array_equal(fitted[index].numpy(), expected.transpose(2, 0, 1))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png: cannot be read as an image"):
        FaceCrops([tmp_path / "broken.png"])[0]


def test_grey_faces_from_the_shared_data_align_to_rgb():
    folder = SHARED_DATA / "orl_faces" / "s1"
    if not folder.is_dir():
        pytest.skip("shared data not present")
    paths = sorted(folder.glob("*.pgm"))[:3]
    # Rough landmarks for 92x112 ORL faces: eyes, nose, mouth corners.
    landmarks = np.tile([[30, 45], [62, 45], [46, 62], [34, 80], [58, 80]], (3, 1, 1))
    crops = FaceCrops(paths, landmarks.astype(np.float64))
    first = crops[0].numpy()
    assert first.shape == (3, 112, 112)
    np.testing.assert_array_equal(first[0], first[1])  # grey: three equal channels
    assert first.std() > 10
