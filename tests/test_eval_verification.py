"""The 10-fold verification protocol against a direct implementation, and .bin set loading."""

import dataclasses
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facescale.eval import (
    VerificationSet,
    evaluate_verification,
    load_verification_set,
    verification_metrics,
)
from facescale.eval.verification import (
    ACCURACY_GRID,
    VAL_FAR,
    VAL_GRID,
    VerificationResult,
    metrics_from_distances,
)


def direct_protocol(distances, issame, folds=10):
    """The standard protocol written out: loops over folds and thresholds, ``np.less``."""
    test_folds = np.array_split(np.arange(len(distances)), folds)
    accuracies, thresholds, vals = [], [], []

    def rates(threshold, d, same):
        accept = np.less(d, threshold)
        tp, fp = np.sum(accept & same), np.sum(accept & ~same)
        tn = np.sum(~accept & ~same)
        val = tp / same.sum() if same.sum() else 0.0
        far = fp / (~same).sum() if (~same).sum() else 0.0
        return (tp + tn) / len(d), val, far

    for test in test_folds:
        train = np.setdiff1d(np.arange(len(distances)), test)
        d_train, s_train = distances[train], issame[train]
        train_acc = [rates(t, d_train, s_train)[0] for t in ACCURACY_GRID]
        best = ACCURACY_GRID[int(np.argmax(train_acc))]
        accuracies.append(rates(best, distances[test], issame[test])[0])
        thresholds.append(best)
        far_curve = [rates(t, d_train, s_train)[2] for t in VAL_GRID]
        val_threshold = 0.0
        if max(far_curve) >= VAL_FAR:
            for i in range(len(VAL_GRID)):
                below = far_curve[i] <= VAL_FAR
                if below and (i + 1 == len(VAL_GRID) or far_curve[i + 1] > VAL_FAR):
                    if i + 1 == len(VAL_GRID) or far_curve[i] == VAL_FAR:
                        val_threshold = VAL_GRID[i]
                    else:
                        w = (VAL_FAR - far_curve[i]) / (far_curve[i + 1] - far_curve[i])
                        val_threshold = VAL_GRID[i] + w * (VAL_GRID[i + 1] - VAL_GRID[i])
                    break
        vals.append(rates(val_threshold, distances[test], issame[test])[1])
    return accuracies, thresholds, vals


def assert_same_as_direct(distances, issame, folds=10):
    fast = metrics_from_distances(distances, issame, folds)
    accuracies, thresholds, vals = direct_protocol(distances, issame, folds)
    assert fast.fold_accuracies == tuple(accuracies)
    assert fast.fold_thresholds == tuple(thresholds)
    assert fast.accuracy == np.mean(accuracies) and fast.std == np.std(accuracies)
    assert fast.threshold == np.mean(thresholds)
    assert fast.val_at_far_1e3 == pytest.approx(np.mean(vals), abs=1e-15)
    return fast


def test_perfectly_separable_pairs_score_100_percent():
    rng = np.random.default_rng(0)
    issame = rng.random(600) < 0.5
    distances = np.where(issame, rng.uniform(0.2, 0.8, 600), rng.uniform(1.5, 3.0, 600))
    metrics = assert_same_as_direct(distances, issame)
    assert metrics.accuracy == 1.0 and metrics.std == 0.0
    assert metrics.val_at_far_1e3 == 1.0
    # The smallest grid threshold above every positive of the nine training folds.
    assert all(0.8 <= t <= 0.81 for t in metrics.fold_thresholds)


def test_the_summary_shows_the_far_that_val_reached():
    # Every impostor at one distance: the training folds' FAR jumps from 0 to 1 there, so the
    # threshold for 1e-3 lands just past it and accepts every held-out impostor.
    issame = np.arange(40) % 2 == 0
    metrics = metrics_from_distances(np.where(issame, 0.5, 1.2), issame)
    assert metrics.val_at_far_1e3 == 1.0 and metrics.far == 1.0
    line = VerificationResult(**dataclasses.asdict(metrics), name="toy", norm=3.0).summary()
    assert "VAL@FAR=1e-3 100.00 % at achieved FAR 1," in line
    rng = np.random.default_rng(1)
    issame = rng.random(8000) < 0.5
    distances = np.where(issame, rng.normal(0.8, 0.2, 8000), rng.normal(1.6, 0.2, 8000))
    metrics = metrics_from_distances(distances, issame)
    line = VerificationResult(**dataclasses.asdict(metrics), name="toy").summary()
    assert 0 < metrics.far < 3e-3 and f"at achieved FAR {metrics.far:.2g}," in line


@pytest.mark.parametrize("pairs", [600, 603, 57])
def test_random_embeddings_match_direct_protocol(pairs):
    rng = np.random.default_rng(pairs)
    e1 = rng.normal(size=(pairs, 8)).astype(np.float32)
    e2 = (e1 + rng.normal(scale=1.2, size=(pairs, 8))).astype(np.float32)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    issame = rng.random(pairs) < 0.5
    e2[~issame] = np.roll(e2[~issame], 1, axis=0)
    metrics = verification_metrics(e1, e2, issame)
    direct = assert_same_as_direct(np.sum(np.square(e1 - e2), axis=1), issame)
    assert metrics == direct
    assert 0.5 < metrics.accuracy < 1.0


def test_distances_on_the_grid_tie_with_thresholds():
    # Every distance equals a grid threshold: "same" needs distance strictly below it.
    rng = np.random.default_rng(1)
    issame = rng.random(800) < 0.5
    positive = ACCURACY_GRID[rng.integers(40, 140, 800)]
    negative = ACCURACY_GRID[rng.integers(100, 250, 800)]
    distances = np.where(issame, positive, negative)
    assert_same_as_direct(distances, issame)
    fine = np.where(
        issame, VAL_GRID[rng.integers(400, 1400, 800)], VAL_GRID[rng.integers(0, 4000, 800)]
    )
    assert_same_as_direct(fine, issame)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="embedding shapes differ"):
        verification_metrics(np.zeros((4, 3)), np.zeros((5, 3)), np.ones(4, bool))
    with pytest.raises(ValueError, match="folds"):
        metrics_from_distances(np.zeros(5), np.ones(5, bool), folds=10)


class TinyEmbedder(nn.Module):
    """A stand-in backbone: fixed random projection of a 4x4-pooled image."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(28)
        self.fc = nn.Linear(3 * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def random_set(pairs: int, seed: int = 0) -> VerificationSet:
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, 256, (pairs, 3, 112, 112), dtype=np.uint8)
    noise = rng.integers(-40, 40, (2 * pairs, 3, 112, 112))
    issame = rng.random(pairs) < 0.5
    partner = np.where(issame, np.arange(pairs), np.roll(np.arange(pairs), 1))
    images = np.stack([faces, faces[partner]], axis=1).reshape(2 * pairs, 3, 112, 112)
    return VerificationSet("toy", np.clip(images + noise, 0, 255).astype(np.uint8), issame)


def test_evaluate_verification_flip_sums_normalises_and_restores_mode():
    torch.manual_seed(0)
    model = TinyEmbedder().train()
    vset = random_set(40)
    result = evaluate_verification(model, vset, batch_size=7)
    assert model.training
    # Reference: one image at a time in float64, the mirror made with numpy.
    reference = model.double().eval()
    views, norms = [], []
    for image in vset.images:
        pair = np.stack([image, image[:, :, ::-1]]).astype(np.float64) / 127.5 - 1.0
        with torch.no_grad():
            out = reference(torch.from_numpy(pair)).numpy()
        norms.extend(np.linalg.norm(out, axis=1))
        views.append(out.sum(0))
    summed = np.array(views)
    unit = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    expected = verification_metrics(unit[0::2], unit[1::2], vset.issame)
    assert result.norm == pytest.approx(np.mean(norms), rel=1e-5)
    assert result.accuracy == expected.accuracy
    assert result.fold_thresholds == expected.fold_thresholds
    record = result.as_dict()
    assert record["name"] == "toy" and record["accuracy"] == result.accuracy
    assert record["cosine_threshold"] == pytest.approx(1 - result.threshold / 2)


def test_an_image_in_many_pairs_is_embedded_once_and_scores_as_if_repeated():
    torch.manual_seed(0)
    model = TinyEmbedder()
    pairs = random_set(40, seed=5)
    slots = np.random.default_rng(6).integers(0, 25, size=80)  # 80 slots, 25 images at most
    images = pairs.images[:25]
    shared = VerificationSet("toy", images, pairs.issame, slots)
    embedded = []
    model.register_forward_hook(lambda module, inputs, output: embedded.append(len(output)))
    result = evaluate_verification(model, shared)
    assert sum(embedded) == 2 * 25  # each image and its mirror, once
    repeated = evaluate_verification(model, VerificationSet("toy", images[slots], pairs.issame))
    assert result.fold_thresholds == repeated.fold_thresholds
    assert result.accuracy == repeated.accuracy and result.far == repeated.far
    assert result.norm == pytest.approx(repeated.norm, rel=1e-9)  # weighted by occurrences


def test_a_pair_naming_a_missing_image_is_refused():
    pairs = random_set(3)
    with pytest.raises(ValueError, match="a pair names a missing image"):
        VerificationSet("toy", pairs.images[:2], pairs.issame, np.array([0, 1, 0, 2, 1, 1]))


def png(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_chw.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bin_set_loads_each_distinct_image_once(tmp_path):
    from facescale.data.bin_format import write_verification_bin

    vset = random_set(6, seed=3)
    encoded = [png(im) for im in vset.images]
    encoded[5] = encoded[0]  # an image in two pairs
    path = tmp_path / "toyset.bin"
    write_verification_bin(path, encoded, vset.issame.tolist())
    loaded = load_verification_set(path)
    assert loaded.name == "toyset" and len(loaded.images) == 11
    expected = vset.images.copy()
    expected[5] = expected[0]
    np.testing.assert_array_equal(loaded.images[loaded.slots], expected)
    np.testing.assert_array_equal(loaded.issame, vset.issame)


def test_bin_with_wrong_image_size_names_the_image(tmp_path):
    from facescale.data.bin_format import write_verification_bin

    small = np.zeros((3, 100, 100), np.uint8)
    path = tmp_path / "small.bin"
    write_verification_bin(path, [png(small)] * 2, [True])
    with pytest.raises(ValueError, match=r"small\.bin: image 0 decodes to \[100, 100, 3\]"):
        load_verification_set(path)


class _RunsCommand:
    """Pickles to a call of os.system: what a hostile .bin would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_bin_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    payload = ([_RunsCommand(f"touch {marker}")], [True])
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=r"lfw\.bin.*refusing"):
        load_verification_set(path)
    assert not marker.exists()
