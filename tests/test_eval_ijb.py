"""IJB-style evaluation on a tiny generated IJB folder: meta files, pooling, TAR, ROC plot."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_align import apply, similarity, smooth_face
from test_eval_verification import TinyEmbedder

from facescale.eval import evaluate_ijb, read_ijb_meta, save_roc_plot
from facescale.eval.align import FaceCrops
from facescale.eval.ijb import IJB_FARS, template_features
from facescale.eval.tar_far import tar_at_far
from facescale.face import ARCFACE_TEMPLATE, warp_affine


def make_ijb(root, identities=5, templates_per_id=3, seed=0):
    """loose_crop/ images and the three meta files of a small IJB-C-like protocol."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    points, medias, template_identity = [], [], {}
    image = 0
    for person in range(identities):
        face = smooth_face(100 + person).astype(int)
        for t in range(templates_per_id):
            template = 1000 + 7 * (person * templates_per_id + t)
            template_identity[template] = person
            for media in rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False):
                for _ in range(rng.integers(1, 4)):
                    image += 1
                    noisy = np.clip(face + rng.integers(-25, 26, face.shape), 0, 255)
                    placed = similarity(
                        rng.uniform(1.0, 1.4), rng.uniform(-0.3, 0.3), rng.uniform(5, 25, 2)
                    )
                    crop = warp_affine(noisy.astype(np.uint8), placed, 170)
                    Image.fromarray(crop).save(root / "loose_crop" / f"{image}.jpg", quality=95)
                    marks = apply(placed, ARCFACE_TEMPLATE) + rng.normal(0, 0.5, (5, 2))
                    score = rng.uniform(0.3, 1.0)
                    points.append(f"{image}.jpg " + " ".join(f"{v:.3f}" for v in marks.ravel()))
                    points[-1] += f" {score:.4f}"
                    medias.append(f"{image}.jpg {template} {int(media)}")
    ids = sorted(template_identity)
    pairs = [
        f"{a} {b} {int(template_identity[a] == template_identity[b])}"
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
    ]
    for name, lines in [("name_5pts_score", points), ("face_tid_mid", medias)]:
        (root / "meta" / f"ijbc_{name}.txt").write_text("\n".join(lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root


def direct_templates(features, templates, medias, scores):
    """The standard pooling written as loops: per template, per media mean, sum, normalise."""
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    if scores is not None:
        features = features * scores[:, None]
    pooled = {}
    for template in np.unique(templates):
        rows = np.flatnonzero(templates == template)
        media_means = [
            features[rows[medias[rows] == media]].mean(0) for media in np.unique(medias[rows])
        ]
        total = np.sum(media_means, axis=0)
        pooled[int(template)] = total / np.linalg.norm(total)
    return pooled


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    return make_ijb(tmp_path_factory.mktemp("ijb") / "IJBC")


def test_meta_files_are_read_and_cross_checked(ijb_root):
    meta = read_ijb_meta(ijb_root, "IJBC")
    assert len(meta.names) == len(meta.templates) == len(meta.landmarks) > 15
    assert meta.landmarks.shape[1:] == (5, 2)
    assert len(meta.pair_labels) == 15 * 14 // 2 and meta.pair_labels.sum() == 5 * 3
    assert set(np.unique(meta.pair_templates)) == set(np.unique(meta.templates))


@pytest.mark.parametrize("weighted", [True, False])
def test_template_pooling_equals_direct_loops(ijb_root, weighted):
    meta = read_ijb_meta(ijb_root, "IJBC")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(meta.names), 12))
    scores = meta.detector_scores.astype(np.float64) if weighted else None
    ids, pooled = template_features(features, meta.templates, meta.medias, scores)
    direct = direct_templates(features, meta.templates, meta.medias, scores)
    assert ids.tolist() == sorted(direct)
    np.testing.assert_allclose(pooled, np.stack([direct[t] for t in ids]), atol=1e-12)


def test_evaluate_ijb_end_to_end(ijb_root, tmp_path):
    torch.manual_seed(0)
    model = TinyEmbedder()
    result = evaluate_ijb(model, ijb_root, "IJBC", batch_size=8)
    # Reference: aligned crops embedded one by one in float64, flip added with numpy.
    meta = read_ijb_meta(ijb_root, "IJBC")
    crops = FaceCrops([ijb_root / "loose_crop" / n for n in meta.names], meta.landmarks)
    reference = TinyEmbedder().double().eval()
    reference.load_state_dict(model.state_dict())
    features = []
    for i in range(len(crops)):
        image = crops[i].numpy().astype(np.float64)
        views = np.stack([image, image[:, :, ::-1]]) / 127.5 - 1.0
        with torch.no_grad():
            features.append(reference(torch.from_numpy(views)).numpy().sum(0))
    weights = meta.detector_scores.astype(np.float64)
    pooled = direct_templates(np.array(features), meta.templates, meta.medias, weights)
    scores = [pooled[int(a)] @ pooled[int(b)] for a, b in meta.pair_templates]
    expected = tar_at_far(np.array(scores), meta.pair_labels, IJB_FARS)
    assert [r.far for r in result.table] == list(IJB_FARS)
    for got, want in zip(result.table, expected, strict=True):
        assert got.threshold == pytest.approx(want.threshold, abs=1e-5)
        assert (got.genuine_accepted, got.impostors_accepted) == (
            want.genuine_accepted,
            want.impostors_accepted,
        )
    assert result.table[-1].tar > 0.5  # same-person templates score above most impostors
    assert "1e-06" in result.format_table() and result.as_dict()["target"] == "IJBC"
    assert np.all(np.diff(result.roc_far) >= 0) and np.all(np.diff(result.roc_tar) >= 0)
    png = save_roc_plot({"tiny": (result.roc_far, result.roc_tar)}, tmp_path / "roc.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300


def test_inconsistent_meta_files_are_named(ijb_root, tmp_path):
    broken = tmp_path / "IJBC"
    broken.mkdir()
    (broken / "meta").mkdir()
    meta = ijb_root / "meta"
    points = (meta / "ijbc_name_5pts_score.txt").read_text()
    medias = (meta / "ijbc_face_tid_mid.txt").read_text()
    pairs = (meta / "ijbc_template_pair_label.txt").read_text()

    def write(points_text, medias_text, pairs_text):
        (broken / "meta" / "ijbc_name_5pts_score.txt").write_text(points_text)
        (broken / "meta" / "ijbc_face_tid_mid.txt").write_text(medias_text)
        (broken / "meta" / "ijbc_template_pair_label.txt").write_text(pairs_text)

    write(points, medias.replace("1.jpg", "x.jpg", 1), pairs)
    with pytest.raises(ValueError, match="same images in the same order"):
        read_ijb_meta(broken, "IJBC")
    write(points.replace(".jpg ", ".jpg 1.0 ", 1), medias, pairs)
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score\.txt: the number of columns"):
        read_ijb_meta(broken, "IJBC")
    write(points, medias, pairs + "1000 99999 0\n")
    with pytest.raises(ValueError, match=r"names 1 templates that have no image.*99999"):
        read_ijb_meta(broken, "IJBC")
    with pytest.raises(FileNotFoundError, match=r"ijbb_name_5pts_score\.txt"):
        read_ijb_meta(broken, "IJBB")
