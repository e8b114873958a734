"""ONNX export (r18, mbf, vit_t; dynamic batch; fp16) and `facescale embed` against PyTorch."""

import json
import logging

import numpy as np
import pytest
import torch
from test_eval_align import apply, similarity, smooth_face, write_png

from facescale.backbones import get_model
from facescale.cli import main
from facescale.data.image import fit_face
from facescale.eval.align import FaceCrops
from facescale.export import compare_onnx, export_onnx, load_backbone
from facescale.face import ARCFACE_TEMPLATE, warp_affine

pytest.importorskip("onnxruntime")


def run_cli(argv, capsys):
    """Run `facescale ARGV` in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def saved_model(tmp_path, network, seed=0):
    torch.manual_seed(seed)
    model = get_model(network, embedding_size=64 if network == "mbf" else 512)
    path = tmp_path / f"{network}.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.mark.parametrize("network", ["r18", "mbf", "vit_t"])
def test_onnx_matches_pytorch_at_any_batch_size(tmp_path, network):
    torch.manual_seed(0)
    model = get_model(network).eval()
    path = export_onnx(model, tmp_path / f"{network}.onnx")
    for batch in (1, 3):
        assert compare_onnx(model, path, batch=batch, seed=batch) < 1e-4


def test_cli_fp16_export_is_half_size_and_close(tmp_path, capsys):
    model, weights = saved_model(tmp_path, "mbf")
    out = tmp_path / "mbf16.onnx"
    code, stdout, _ = run_cli(
        ["export", "onnx", str(weights), "--network", "mbf", "--embedding-size", "64",
         str(out), "--fp16", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    report = json.loads(stdout)
    assert report["fp16"] and report["max_relative_error"] < 5e-3
    fp32_bytes = sum(p.numel() * 4 for p in model.state_dict().values() if p.is_floating_point())
    assert report["bytes"] < 0.6 * fp32_bytes
    assert compare_onnx(model, out, batch=2) < 5e-3


def test_weights_of_another_network_are_refused_naming_the_one_they_fit(tmp_path, capsys):
    _, weights = saved_model(tmp_path, "mbf")
    fits = "it loads with --network mbf --embedding-size 64$"
    with pytest.raises(ValueError, match=rf"{weights.name}.*missing keys.*{fits}"):
        load_backbone("r18", weights)
    with pytest.raises(ValueError, match=rf"shape mismatches.*{fits}"):
        load_backbone("mbf_small", weights, 64)  # the same names at half the width
    with pytest.raises(ValueError, match=rf"shape mismatches.*{fits}"):
        load_backbone("mbf", weights, 128)
    code, _, err = run_cli(
        ["export", "onnx", str(weights), "--network", "r18", str(tmp_path / "x.onnx")], capsys
    )
    assert code == 2 and err.startswith(f"facescale export: error: {weights}: ")


def test_weights_that_fit_no_network_get_no_suggestion(tmp_path):
    state = get_model("mbf", embedding_size=64).state_dict()
    del state["conv_sep.layers.0.weight"]
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"missing keys \(conv_sep.layers.0.weight\)") as err:
        load_backbone("mbf", tmp_path / "state.pt", 64)
    assert "it loads with" not in str(err.value)


def direct_embeddings(model, images_chw):
    """Flip-summed, L2-normalised embeddings computed one image at a time."""
    rows = []
    for image in images_chw:
        views = np.stack([image, image[:, :, ::-1]]).astype(np.float32) / 127.5 - 1.0
        with torch.no_grad():
            rows.append(model(torch.from_numpy(views)).double().numpy().sum(0))
    rows = np.array(rows)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_cli_embeds_a_folder_of_aligned_crops(tmp_path, capsys):
    model, weights = saved_model(tmp_path, "mbf")
    folder = tmp_path / "faces"
    (folder / "a").mkdir(parents=True)
    faces = [smooth_face(seed) for seed in range(3)]
    for name, face in zip(["a/1.png", "b.png", "c.png"], faces, strict=True):
        write_png(folder / name, face)
    out = tmp_path / "emb.npy"
    code, stdout, _ = run_cli(
        ["embed", str(weights), "--network", "mbf", "--embedding-size", "64", str(folder),
         "-o", str(out), "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    report = json.loads(stdout)
    listed = (tmp_path / "emb.txt").read_text().split()
    assert report["count"] == 3 and listed == [
        str(folder / n) for n in ["a/1.png", "b.png", "c.png"]
    ]
    expected = direct_embeddings(model, [f.transpose(2, 0, 1) for f in faces])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_cli_aligns_with_a_landmark_file(tmp_path, capsys):
    model, weights = saved_model(tmp_path, "mbf")
    placed = similarity(1.5, 0.25, (40.0, 10.0))
    loose = write_png(tmp_path / "loose.png", warp_affine(smooth_face(7), placed, 220))
    marks = apply(placed, ARCFACE_TEMPLATE).ravel()
    landmarks = tmp_path / "marks.txt"
    landmarks.write_text("loose.png " + " ".join(repr(float(v)) for v in marks) + " 0.99\n")
    out = tmp_path / "aligned.npy"
    argv = ["embed", str(weights), "--network", "mbf", "--embedding-size", "64", str(loose)]
    code, _, _ = run_cli([*argv, "-o", str(out), "--landmarks", str(landmarks)], capsys)
    assert code == 0
    aligned = FaceCrops([loose], apply(placed, ARCFACE_TEMPLATE)[None])[0].numpy()
    np.testing.assert_allclose(np.load(out), direct_embeddings(model, [aligned]), atol=1e-5)
    landmarks.write_text("other.png " + " ".join(["1"] * 10) + "\n")
    code, _, err = run_cli([*argv, "-o", str(out), "--landmarks", str(landmarks)], capsys)
    assert code == 2 and "no landmarks for" in err and "loose.png" in err


def test_cli_fits_images_without_landmarks_and_warns(tmp_path, capsys, caplog):
    model, weights = saved_model(tmp_path, "mbf")
    photo = np.tile(smooth_face(5), (2, 3, 1))  # 224x336: not an aligned crop
    path = write_png(tmp_path / "photo.png", photo)
    out = tmp_path / "fitted.npy"
    argv = ["embed", str(weights), "--network", "mbf", "--embedding-size", "64", str(path)]
    with caplog.at_level(logging.WARNING, logger="facescale.eval"):
        code, _, _ = run_cli([*argv, "-o", str(out)], capsys)
    assert code == 0
    assert any("1 of 1 images are not 112x112" in r.message for r in caplog.records)
    fitted = fit_face(photo).transpose(2, 0, 1)
    np.testing.assert_allclose(np.load(out), direct_embeddings(model, [fitted]), atol=1e-5)


class _RecordsPrecision(torch.nn.Module):
    """A linear embedding that notes whether float32 products were exact when it ran."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 112 * 112, 8)
        self.precisions = []

    def forward(self, images):
        self.precisions.append(
            (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        )
        return self.linear(images.flatten(1))


def test_the_onnx_check_reference_ignores_tf32(tmp_path):
    torch.manual_seed(0)
    model = _RecordsPrecision()
    path = export_onnx(model, tmp_path / "linear.onnx")
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        model.precisions.clear()
        assert compare_onnx(model, path) < 1e-4
    finally:
        torch.set_float32_matmul_precision("highest")
    assert model.precisions == [("highest", False)]
