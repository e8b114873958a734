"""Found landmarks: the output network equals a float64 reference of the stored weights'
layout, the points follow a moved face and land on the template in an aligned one, and
`--align` aligns what `convert folder2rec`, `convert pairs2bin` and `eval verification` read;
without the extra a command says which to install before any work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from test_extras import refusal_without

from facescale.backbones import get_model
from facescale.cli import main
from facescale.data.image import decode_image, encode_jpeg, read_rgb
from facescale.data.pairs_file import write_pairs_file
from facescale.data.recordio import IndexedRecordFile
from facescale.data.records import unpack_record
from facescale.errors import InputError
from facescale.eval.pairs_set import load_pairs_set
from facescale.eval.verification import load_verification_set
from facescale.face import ARCFACE_TEMPLATE, align_face, warp_affine

if importlib.util.find_spec("mtcnn") is None or importlib.util.find_spec("joblib") is None:
    pytest.skip("the 'align' extra is not installed", allow_module_level=True)

from facescale.landmarks import (
    FaceAligner,
    LandmarkFinder,
    find_landmarks,
    load_output_net,
    weights_path,
)

CFP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cfp" / "images"
needs_cfp = pytest.mark.skipif(not CFP.is_dir(), reason="../shared/data/cfp is absent")


@pytest.fixture(scope="module")
def finder() -> LandmarkFinder:
    return LandmarkFinder()


def frontal_faces(count: int) -> list[Path]:
    """Frontal CFP photos of different people, of many sizes and framings."""
    return [CFP / f"{person:03d}" / "frontal" / "01.jpg" for person in range(1, count + 1)]


# A float64 reference of the stored weights as Keras lays them out: images height x width x
# channels, kernels [kh, kw, in, out], 'same' pooling padded at the bottom and right, and the
# layer after the convolutions reading its input transposed to width x height x channels.
def conv_nhwc(x, kernel, bias):
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))  # [N, H', W', C, kh, kw]
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias


def prelu(x, slope):
    return np.where(x > 0, x, x * slope.reshape(-1))


def max_pool_nhwc(x, size, same):
    height, width = x.shape[1:3]
    out_h = -(-height // 2) if same else (height - size) // 2 + 1
    out_w = -(-width // 2) if same else (width - size) // 2 + 1
    pad_h, pad_w = max((out_h - 1) * 2 + size - height, 0), max((out_w - 1) * 2 + size - width, 0)
    x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-np.inf)
    windows = sliding_window_view(x, (size, size), axis=(1, 2))[:, ::2, ::2]
    return windows.max(axis=(-1, -2))[:, :out_h, :out_w]


def reference_output_net(arrays, views_nhwc):
    w = [np.asarray(a, dtype=np.float64) for a in arrays]
    x = views_nhwc
    pools = [(3, True), (3, False), (2, True), None]
    for i, pool in enumerate(pools):
        x = prelu(conv_nhwc(x, w[3 * i], w[3 * i + 1]), w[3 * i + 2])
        if pool is not None:
            x = max_pool_nhwc(x, *pool)
    x = prelu(x.transpose(0, 2, 1, 3).reshape(len(x), -1) @ w[12] + w[13], w[14])
    face = x @ w[19] + w[20]
    face = np.exp(face - face.max(axis=1, keepdims=True))
    return x @ w[15] + w[16], x @ w[17] + w[18], face[:, 1] / face.sum(axis=1)


def test_the_network_equals_a_float64_reference_of_the_stored_layout():
    import joblib

    arrays = joblib.load(weights_path())
    views = np.random.default_rng().uniform(-1, 1, size=(5, 48, 48, 3))
    expected = reference_output_net(arrays, views)
    net = load_output_net().double()
    with torch.no_grad():
        found = net(torch.from_numpy(views).permute(0, 3, 1, 2))
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@needs_cfp
def test_landmarks_follow_a_turned_shrunk_and_moved_face(finder):
    """Turn each photo 12 degrees, shrink it to 0.8 and move it: the points found in the new
    image are the old points moved alike, within 0.15 of the eyes' distance (median)."""
    errors = []
    for path in frontal_faces(10):
        image = read_rgb(path)
        height, width = image.shape[:2]
        before = finder(image).points
        angle, scale = np.deg2rad(12), 0.8
        cos, sin = scale * np.cos(angle), scale * np.sin(angle)
        matrix = np.array([[cos, -sin, 0.1 * width], [sin, cos, -0.05 * height]])
        moved = warp_affine(image, matrix, max(height, width))
        after = finder(moved).points
        expected = before @ matrix[:, :2].T + matrix[:, 2]
        eyes = scale * np.linalg.norm(before[1] - before[0])
        errors.append(np.abs(after - expected).max() / eyes)
    assert np.median(errors) < 0.15, np.round(errors, 3)


@needs_cfp
def test_the_points_of_an_aligned_face_are_the_template(finder):
    """Found again in the aligned 112x112 face, the points are where alignment put them:
    within 3 pixels of the template on average (median over photos)."""
    errors = []
    for path in frontal_faces(10):
        image = read_rgb(path)
        found = finder(image)
        assert found.score > 0.9
        left_eye, right_eye, nose, left_mouth, right_mouth = found.points
        assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
        again = finder(align_face(image, found.points)).points
        errors.append(np.linalg.norm(again - ARCFACE_TEMPLATE, axis=1).mean())
    assert np.median(errors) < 3.0, np.round(errors, 2)


@pytest.fixture(scope="module")
def faces_folder(tmp_path_factory) -> Path:
    """Two identities of two CFP photos each, as `convert folder2rec` reads them."""
    if not CFP.is_dir():
        pytest.skip("../shared/data/cfp is absent")
    root = tmp_path_factory.mktemp("faces")
    for person in (1, 2):
        folder = root / f"person_{person}"
        folder.mkdir()
        for index in (1, 2):
            source = CFP / f"{person:03d}" / "frontal" / f"{index:02d}.jpg"
            (folder / f"{index}.jpg").symlink_to(source)
    return root


def convert(conversion: str, src: Path, dst: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["convert", conversion, str(src), str(dst), "--align", "--no-progress"])
    assert done.value.code == 0


def aligned_as_stored(path: Path, aligner: FaceAligner) -> np.ndarray:
    """What a converter stores for an image with --align: its aligned face, JPEG-encoded."""
    return decode_image(encode_jpeg(aligner(read_rgb(path))))


@needs_cfp
def test_folder2rec_and_pairs2bin_store_the_aligned_faces(faces_folder, tmp_path):
    aligner = FaceAligner()
    images = sorted(faces_folder.glob("*/*.jpg"))
    out = tmp_path / "rec"
    convert("folder2rec", faces_folder, out)
    rec = IndexedRecordFile(out / "train.rec")
    for key, path in enumerate(images, 1):
        record = unpack_record(rec.read(key), str(key))
        np.testing.assert_array_equal(decode_image(record.image), aligned_as_stored(path, aligner))
    rec.close()

    pairs = write_pairs_file(
        tmp_path / "pairs.txt", [(images[0], images[1], True), (images[0], images[2], False)]
    )
    convert("pairs2bin", pairs, tmp_path / "p.bin")
    stored = load_verification_set(tmp_path / "p.bin")
    for row, path in zip(stored.images, images[:3], strict=True):
        np.testing.assert_array_equal(row.transpose(1, 2, 0), aligned_as_stored(path, aligner))

    read = load_pairs_set(pairs, align=True)  # eval verification --align: aligned, not stored
    for row, path in zip(read.images, images[:3], strict=True):
        np.testing.assert_array_equal(row.transpose(1, 2, 0), aligner(read_rgb(path)))
    with pytest.raises(InputError, match=r"a \.bin holds aligned crops already"):
        load_verification_set(tmp_path / "p.bin", align=True)


def test_align_without_the_extra_is_one_line_before_any_work(tmp_path):
    """The source folder does not even exist: the missing extra is found before it is read."""
    out = tmp_path / "rec"
    argv = ["convert", "folder2rec", str(tmp_path / "absent"), str(out), "--align"]
    refusal = refusal_without("mtcnn", argv)
    assert refusal.startswith("facescale convert: error: face alignment (--align) needs mtcnn")
    assert 'pip install "facescale[align]"' in refusal
    assert not out.exists()


def test_a_low_face_score_is_counted_and_reported_once(caplog):
    """A crop of plain noise is aligned all the same, and counted in one warning."""
    aligner = FaceAligner()
    noise = np.random.default_rng().integers(0, 256, size=(90, 70, 3), dtype=np.uint8)
    face = aligner(noise)
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    assert (aligner.finder.found, aligner.finder.low_scores) == (1, 1)
    with caplog.at_level("WARNING", logger="facescale.landmarks"):
        aligner.finder.report("noise")
    assert "noise: 1 of 1 images scored below 0.5 as faces" in caplog.text


@needs_cfp
def test_embed_align_is_embed_with_the_found_landmarks(faces_folder, tmp_path):
    """`facescale embed --align` embeds what `--landmarks` does given the found points."""
    torch.manual_seed(0)
    weights = tmp_path / "mbf.pt"
    torch.save(get_model("mbf", embedding_size=64).state_dict(), weights)
    images = sorted(faces_folder.glob("*/*.jpg"))
    table = tmp_path / "marks.txt"
    rows = find_landmarks(images, "test").reshape(len(images), -1)
    table.write_text(
        "".join(
            f"{p} {' '.join(map(repr, row.tolist()))}\n"
            for p, row in zip(images, rows, strict=True)
        )
    )
    model = ["embed", str(weights), "--network", "mbf", "--embedding-size", "64", *map(str, images)]
    for how, out in ((["--align"], "found.npy"), (["--landmarks", str(table)], "given.npy")):
        with pytest.raises(SystemExit) as done:
            main([*model, "-o", str(tmp_path / out), *how])
        assert done.value.code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "found.npy"), np.load(tmp_path / "given.npy"))
