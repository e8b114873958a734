"""Blockwise TAR@FAR against a brute-force full score matrix: thresholds and counts equal."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from dist_utils import run_ranks

from facescale.eval import tar_at_far, tar_at_far_all_pairs, tar_at_far_probe_gallery

FARS = ["1e-4", "1e-3", "1e-2", "0.1"]


def brute_force(scores, genuine, fars):
    """From the definition: the lowest impostor score t with at most k impostors above it."""
    impostors = np.sort(scores[~genuine])
    genuine_scores = scores[genuine]
    rows = []
    for far in fars:
        k = int(Fraction(far) * len(impostors))  # floor, exact for the decimal FAR
        above = len(impostors) - np.searchsorted(impostors, impostors, side="right")
        threshold = impostors[above <= k].min()
        rows.append(
            (
                threshold,
                int((genuine_scores > threshold).sum()),
                len(genuine_scores),
                int((impostors > threshold).sum()),
                len(impostors),
            )
        )
    return rows


def as_rows(results):
    return [
        (r.threshold, r.genuine_accepted, r.genuine, r.impostors_accepted, r.impostors)
        for r in results
    ]


def brute_all_pairs(features, labels, fars):
    full = features.astype(np.float64) @ features.astype(np.float64).T
    upper = np.triu_indices(len(features), k=1)
    return brute_force(full[upper], (labels[:, None] == labels[None, :])[upper], fars)


def brute_probe_gallery(probe, probe_labels, gallery, gallery_labels, fars):
    full = probe.astype(np.float64) @ gallery.astype(np.float64).T
    return brute_force(
        full.ravel(), (probe_labels[:, None] == gallery_labels[None, :]).ravel(), fars
    )


def dyadic_features(n, dim, classes, seed):
    """Unit-ish features on a 2^-20 grid: float64 scores are exact in any summation order,
    float32 scores are rounded, so the float64 rescoring is what makes results exact."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = rng.normal(size=(classes, dim))[labels] * 0.4 + rng.normal(size=(n, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return (np.round(features * 2**20) / 2**20).astype(np.float32), labels


def rounding_trap_features(n, seed):
    """Scores 1 + a sum of terms about one float32 ulp (2^-23) each, on a 2^-32 grid: exact
    in float64, while float32 rounds after each term and so reorders close scores."""
    rng = np.random.default_rng(seed)
    features = np.zeros((n, 6), np.float32)
    features[:, 0] = 1.0
    features[:, 1:] = rng.integers(-40, 41, (n, 5)) * 2.0**-16
    return features, rng.integers(0, n // 4, n)


def float_fars(fars):
    return [float(f) for f in fars]


def test_definition_on_a_hand_made_list():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.6, 1.0])
    genuine = np.array([False, False, False, False, True, True, True])
    quarter, half = tar_at_far(scores, genuine, [0.25, 0.5])
    # k = 1: threshold = 2nd largest impostor (0.5); only 0.9 is above it.
    assert (quarter.threshold, quarter.impostors_accepted, quarter.genuine_accepted) == (0.5, 1, 2)
    # k = 2: the 3rd largest is 0.5 again; the tie keeps the accepted impostors at 1.
    assert (half.threshold, half.impostors_accepted, half.tar) == (0.5, 1, 2 / 3)
    assert half.achieved_far == 0.25


@pytest.mark.parametrize(("block", "n"), [(7, 200), (64, 500), (1000, 500)])
def test_all_pairs_equal_brute_force(block, n):
    features, labels = dyadic_features(n, 32, n // 6, seed=block)
    fast = tar_at_far_all_pairs(features, labels, float_fars(FARS), block=block)
    assert as_rows(fast) == brute_all_pairs(features, labels, FARS)
    as32 = features @ features.T
    assert (
        as32.astype(np.float64) != features.astype(np.float64) @ features.T.astype(np.float64)
    ).any()


@pytest.mark.parametrize("block", [13, 128])
def test_probe_gallery_equal_brute_force(block):
    features, labels = dyadic_features(450, 24, 60, seed=7)
    probe, gallery = features[:150], features[150:]
    fast = tar_at_far_probe_gallery(
        probe, labels[:150], gallery, labels[150:], float_fars(FARS), block=block
    )
    assert as_rows(fast) == brute_probe_gallery(probe, labels[:150], gallery, labels[150:], FARS)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_rounding_that_reorders_scores_is_undone(seed):
    features, labels = rounding_trap_features(300, seed)
    upper = np.triu_indices(len(features), k=1)
    scores32 = (features @ features.T)[upper]
    scores64 = (features.astype(np.float64) @ features.T.astype(np.float64))[upper]
    assert (np.diff(scores32[np.argsort(scores64, kind="stable")]) < 0).any()  # reordered
    fars = ["1e-4", "1e-3", "0.01", "0.3"]
    fast = tar_at_far_all_pairs(features, labels, float_fars(fars), block=37)
    assert as_rows(fast) == brute_all_pairs(features, labels, fars)


def test_integer_features_with_many_exact_ties():
    rng = np.random.default_rng(5)
    features = rng.integers(-1, 2, (300, 6)).astype(np.float32)
    labels = rng.integers(0, 40, 300)
    fast = tar_at_far_all_pairs(features, labels, float_fars(FARS), block=32)
    assert as_rows(fast) == brute_all_pairs(features, labels, FARS)
    for result, far in zip(fast, FARS, strict=True):
        assert result.impostors_accepted <= int(Fraction(far) * result.impostors)


def _on_ranks(rank, world, features, labels, fars):
    all_pairs = tar_at_far_all_pairs(features, labels, fars, block=40)
    probe_gallery = tar_at_far_probe_gallery(
        features[:100], labels[:100], features[100:], labels[100:], fars, block=30
    )
    return as_rows(all_pairs), as_rows(probe_gallery)


def test_two_ranks_equal_one_process():
    features, labels = dyadic_features(320, 16, 50, seed=11)
    fars = float_fars(FARS)
    one = _on_ranks(0, 1, features, labels, fars)
    for result in run_ranks(_on_ranks, 2, features, labels, fars):
        assert result == one


def test_bad_input_is_refused_with_reasons():
    features = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="0 genuine"):
        tar_at_far_all_pairs(features, np.arange(4))
    with pytest.raises(ValueError, match="0 impostor"):
        tar_at_far_all_pairs(features, np.zeros(4, int))
    with pytest.raises(ValueError, match="4 integer labels"):
        tar_at_far_all_pairs(features, np.arange(3))
    bad = features.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tar_at_far_all_pairs(bad, np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        tar_at_far_all_pairs(features, np.array([0, 0, 1, 1]), [1.0])
    with pytest.raises(ValueError, match="3 dimensions, gallery features 2"):
        tar_at_far_probe_gallery(features, np.arange(4), torch.ones(2, 2), np.arange(2))


def test_a_rank_without_blocks_answers_on_the_labels_device():
    """A rank given no row block returns its (empty) pairs where the labels live, so a GPU
    rank's masks index them without a device mismatch."""
    from facescale.eval.tar_far import _ImpostorPool

    labels = torch.arange(6, device="meta")
    pool = _ImpostorPool(keep=4, slack=0.0, query_labels=labels, ref_labels=labels)
    scores, rows, cols = pool._decoded()
    assert {scores.device.type, rows.device.type, cols.device.type} == {"meta"}
    assert len(scores) == len(rows) == len(cols) == 0
