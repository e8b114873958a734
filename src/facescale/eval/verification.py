"""Pair verification (LFW, CFP-FP, AgeDB-30, any InsightFace ``.bin`` set): the 10-fold protocol.

Embeddings of each image and its mirror image are summed and L2-normalised; a pair is called
"same" when the squared L2 distance of its two embeddings is strictly below a threshold.
Fold ``f`` of ``folds`` is a contiguous slice of the pairs, as sklearn's unshuffled ``KFold``
cuts it. For each fold the threshold with the best accuracy on the other folds is taken from
the grid ``0, 0.01, ..., 3.99`` (the smallest one on a tie) and scored on the held-out fold.

VAL at FAR 1e-3 follows the same protocol on the finer grid ``0, 0.001, ..., 3.999``: on the
training folds the false-accept rate is a non-decreasing step function of the grid; the
threshold is where the straight line between the last grid point at or below the target rate
and the next grid point reaches the target (the last point itself when its rate equals the
target or nothing follows it), or 0 when the rate never reaches the target. The standard
evaluation interpolates the same curve with scipy's ``interp1d``, which recent scipy refuses
because the rates repeat. A rate whose denominator is zero (a fold without positives or
negatives) counts as 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.errors import InputError
from facescale.eval.embedding import embed_batches, l2_normalize
from facescale.face import FACE_SIZE

ACCURACY_GRID = np.arange(0, 4, 0.01)
VAL_GRID = np.arange(0, 4, 0.001)
VAL_FAR = 1e-3


@dataclass(frozen=True)
class VerificationMetrics:
    """10-fold results on one pair list; accuracies are fractions, thresholds squared distances."""

    accuracy: float
    std: float
    threshold: float
    val_at_far_1e3: float
    val_std: float
    far: float
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]

    @property
    def cosine_threshold(self) -> float:
        """``threshold`` as a cosine similarity: for unit vectors ``|a - b|^2 = 2 - 2 cos``."""
        return 1.0 - self.threshold / 2.0


@dataclass(frozen=True)
class VerificationResult(VerificationMetrics):
    """Metrics of one set plus its name and the mean single-view embedding norm."""

    name: str = ""
    norm: float = 0.0

    def summary(self) -> str:
        """One line for people; VAL is shown beside the false-accept rate its threshold gave on
        the held-out folds, which a small set cannot bring down to the 1e-3 aimed at."""
        return (
            f"{self.name}: accuracy {100 * self.accuracy:.2f} +- {100 * self.std:.2f} %, "
            f"threshold {self.threshold:.3f} (cosine {self.cosine_threshold:.3f}), "
            f"VAL@FAR=1e-3 {100 * self.val_at_far_1e3:.2f} % at achieved FAR {self.far:.2g}, "
            f"XNorm {self.norm:.4g}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON/TensorBoard-ready figures (per-fold lists included)."""
        values = asdict(self)
        values["fold_accuracies"] = list(self.fold_accuracies)
        values["fold_thresholds"] = list(self.fold_thresholds)
        values["cosine_threshold"] = self.cosine_threshold
        return values


@dataclass(frozen=True)
class VerificationSet:
    """A decoded verification set: its distinct images ``[N, 3, 112, 112]`` uint8 RGB, each
    pair's two rows of them (pair ``p`` is ``images[slots[2p]]`` and ``images[slots[2p + 1]]``)
    and ``issame[p]``. An image in many pairs is held, and embedded, once; without ``slots``
    pair ``p`` is images ``2p`` and ``2p + 1``."""

    name: str
    images: np.ndarray
    issame: np.ndarray
    slots: np.ndarray = None  # type: ignore[assignment]  # filled in by __post_init__

    def __post_init__(self) -> None:
        shape = self.images.shape
        if (
            self.images.dtype != np.uint8
            or len(shape) != 4
            or shape[1:] != (3, FACE_SIZE, FACE_SIZE)
        ):
            raise InputError(
                f"verification set {self.name!r}: images must be uint8 "
                f"[N, 3, {FACE_SIZE}, {FACE_SIZE}], "
                f"got {self.images.dtype} {list(shape)}"
            )
        if self.slots is None:
            object.__setattr__(self, "slots", np.arange(shape[0]))
        if len(self.slots) != 2 * len(self.issame):
            raise InputError(
                f"verification set {self.name!r}: {len(self.slots)} images for "
                f"{len(self.issame)} pairs; a set holds exactly two images per pair"
            )
        if len(self.slots) and not 0 <= self.slots.min() <= self.slots.max() < shape[0]:
            raise InputError(f"verification set {self.name!r}: a pair names a missing image")


def distinct(items: Sequence[Hashable]) -> tuple[list[Any], np.ndarray]:
    """The distinct ``items`` in first-seen order, and each item's index among them."""
    index: dict[Hashable, int] = {}
    slots = np.array([index.setdefault(item, len(index)) for item in items], dtype=np.int64)
    return list(index), slots


def load_verification_set(path: str | Path, align: bool = False) -> VerificationSet:
    """Decode a verification set once: an InsightFace ``.bin`` (never unpickled), or a pairs
    file of image paths (any other name, :mod:`facescale.data.pairs_file`), its face crops
    aligned by found landmarks with ``align``. Each distinct image is decoded once."""
    path = Path(path)
    if path.suffix != ".bin":
        from facescale.eval.pairs_set import load_pairs_set

        return load_pairs_set(path, align)
    if align:
        raise InputError(f"{path}: a .bin holds aligned crops already; --align is for pairs files")
    unique, slots, issame = read_bin(path)
    return VerificationSet(path.stem, decode_faces(unique, slots, path), issame, slots)


def read_bin(path: Path) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """A ``.bin`` set's distinct encoded images (the same bytes once), its pairs' rows of them
    (:attr:`VerificationSet.slots`) and ``issame``; nothing is decoded yet."""
    from facescale.data import load_verification_bin

    encoded, issame = load_verification_bin(path)
    unique, slots = distinct(encoded)
    return unique, slots, np.asarray(issame, dtype=bool)


def decode_faces(
    unique: Sequence[Any], slots: np.ndarray, path: Path, lo: int = 0, hi: int | None = None
) -> np.ndarray:
    """Distinct images ``lo:hi`` of the set at ``path`` (:func:`read_bin`) as uint8
    [N, 3, 112, 112]; one that is not a 112x112 crop is named by its first place in the set."""
    from facescale.data import decode_image

    hi = len(unique) if hi is None else hi
    numbers = np.unique(slots, return_index=True)[1][lo:hi]  # distinct are in first-seen order
    images = np.empty((hi - lo, 3, FACE_SIZE, FACE_SIZE), dtype=np.uint8)
    for offset, (buffer, number) in enumerate(zip(unique[lo:hi], numbers, strict=True)):
        image = decode_image(buffer)
        if image.shape != (FACE_SIZE, FACE_SIZE, 3):
            raise InputError(
                f"{path}: image {number} decodes to {list(image.shape)}; verification "
                f"sets hold aligned {FACE_SIZE}x{FACE_SIZE} RGB crops"
            )
        images[offset] = image.transpose(2, 0, 1)
    return images


def fold_slices(pairs: int, folds: int) -> list[slice]:
    """Contiguous test folds; the first ``pairs % folds`` are one pair longer (sklearn KFold)."""
    if not 2 <= folds <= pairs:
        raise InputError(f"{folds} folds need 2 <= folds <= number of pairs ({pairs})")
    sizes = [pairs // folds + (f < pairs % folds) for f in range(folds)]
    starts = np.cumsum([0, *sizes])
    return [slice(int(starts[f]), int(starts[f + 1])) for f in range(folds)]


def _accepted(distances: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many of ``distances`` are strictly below it."""
    return np.searchsorted(np.sort(distances), thresholds, side="left")


def _rate(count: np.ndarray, total: int) -> np.ndarray:
    return count / total if total else np.zeros(len(count))


def accuracy_curve(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same iff distance < t" for every ``t`` in ``thresholds``."""
    true_accepts = _accepted(distances[issame], thresholds)
    false_accepts = _accepted(distances[~issame], thresholds)
    true_rejects = (~issame).sum() - false_accepts
    return (true_accepts + true_rejects) / len(distances)


def val_far(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[2, T]``: true-accept rate (VAL) and false-accept rate (FAR) at each threshold."""
    val = _rate(_accepted(distances[issame], thresholds), int(issame.sum()))
    far = _rate(_accepted(distances[~issame], thresholds), int((~issame).sum()))
    return np.stack([val, far])


def threshold_at_far(far_curve: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Where the piecewise-linear FAR(threshold) curve reaches ``target`` (module docstring)."""
    if far_curve.max() < target:
        return 0.0
    last = int(np.searchsorted(far_curve, target, side="right")) - 1
    if last == len(far_curve) - 1 or far_curve[last] == target:
        return float(thresholds[last])
    step = (target - far_curve[last]) / (far_curve[last + 1] - far_curve[last])
    return float(thresholds[last] + step * (thresholds[last + 1] - thresholds[last]))


def metrics_from_distances(
    distances: np.ndarray, issame: np.ndarray, folds: int = 10
) -> VerificationMetrics:
    """The 10-fold protocol on precomputed squared distances (module docstring)."""
    distances = np.asarray(distances)
    issame = np.asarray(issame, dtype=bool)
    if distances.shape != issame.shape or distances.ndim != 1:
        raise ValueError(
            f"distances {list(distances.shape)} and issame {list(issame.shape)} must be "
            "1-D and of equal length"
        )
    accuracies, thresholds, vals, fars = [], [], [], []
    for test in fold_slices(len(distances), folds):
        train = np.ones(len(distances), dtype=bool)
        train[test] = False
        best = ACCURACY_GRID[
            np.argmax(accuracy_curve(distances[train], issame[train], ACCURACY_GRID))
        ]
        accuracies.append(float(accuracy_curve(distances[test], issame[test], np.array([best]))[0]))
        thresholds.append(float(best))
        train_far = val_far(distances[train], issame[train], VAL_GRID)[1]
        val_threshold = threshold_at_far(train_far, VAL_GRID, VAL_FAR)
        val, far = val_far(distances[test], issame[test], np.array([val_threshold]))[:, 0]
        vals.append(float(val))
        fars.append(float(far))
    return VerificationMetrics(
        accuracy=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        threshold=float(np.mean(thresholds)),
        val_at_far_1e3=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far=float(np.mean(fars)),
        fold_accuracies=tuple(accuracies),
        fold_thresholds=tuple(thresholds),
    )


def verification_metrics(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, folds: int = 10
) -> VerificationMetrics:
    """The 10-fold protocol on L2-normalised embedding pairs ``[P, D]`` and ``issame[P]``."""
    if embeddings1.shape != embeddings2.shape:
        raise ValueError(
            f"embedding shapes differ: {list(embeddings1.shape)} vs {list(embeddings2.shape)}"
        )
    distances = np.sum(np.square(embeddings1 - embeddings2), axis=1)
    return metrics_from_distances(distances, issame, folds)


def evaluate_verification(
    model: nn.Module,
    vset: VerificationSet,
    batch_size: int = 64,
    device: torch.device | None = None,
    folds: int = 10,
) -> VerificationResult:
    """Embed a set's distinct images with flip-sum, and score its pairs."""
    device = device or torch.device("cpu")
    images = torch.from_numpy(vset.images)
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    features, norms = embed_batches(model, batches, device, flip=True)
    return score_pairs(features, norms, vset.slots, vset.issame, vset.name, folds)


def score_pairs(
    features: np.ndarray,
    norms: np.ndarray,
    slots: np.ndarray,
    issame: np.ndarray,
    name: str,
    folds: int = 10,
) -> VerificationResult:
    """The 10-fold protocol on the embeddings and single-view norms of a set's distinct images
    (:func:`embed_batches`), pair ``p`` being rows ``slots[2p]`` and ``slots[2p + 1]``; XNorm
    counts an image as often as pairs hold it."""
    features = l2_normalize(features)[slots]
    metrics = verification_metrics(features[0::2], features[1::2], issame, folds)
    return VerificationResult(**asdict(metrics), name=name, norm=float(norms[slots].mean()))
