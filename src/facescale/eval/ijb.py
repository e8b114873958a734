"""IJB-B / IJB-C 1:1 template verification from the official meta files.

A dataset folder (``IJBB`` or ``IJBC``) holds ``loose_crop/`` images and, in ``meta/``,
``<t>_name_5pts_score.txt`` (image name, five landmarks, detector score),
``<t>_face_tid_mid.txt`` (image name, template id, media id, in the same order) and
``<t>_template_pair_label.txt`` (template, template, 1 for the same person), ``<t>`` being
``ijbb`` or ``ijbc``. Each crop is aligned from its landmarks and embedded with flip-sum; the
L2-normalised image features (optionally times their detector score) are averaged per media,
the media averages summed per template, and the template features L2-normalised. A pair
scores the dot product of its two templates; TAR at FAR uses the exact definition of
:mod:`facescale.eval.tar_far`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.errors import InputError
from facescale.eval.align import FaceCrops
from facescale.eval.embedding import embed_batches, l2_normalize
from facescale.eval.tar_far import TarAtFar, tar_at_far

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ROC_FARS = tuple(float(f) for f in np.logspace(-6, -0.05, 120))


@dataclass(frozen=True)
class IJBMeta:
    """One IJB protocol: per image its file, landmarks ``[5, 2]``, detector score, template and
    media; per pair its two template ids and whether they show the same person."""

    names: list[str]
    landmarks: np.ndarray
    detector_scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_templates: np.ndarray
    pair_labels: np.ndarray


def _table(path: Path, dtype: type, columns: int) -> np.ndarray:
    """The whitespace-separated rows of a meta file as a ``[rows, columns]`` array."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB meta file not found")
    try:
        table = np.loadtxt(path, dtype=dtype, ndmin=2, comments=None)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None
    if table.size == 0 or table.shape[1] != columns:
        raise InputError(f"{path}: expected rows of {columns} fields, found {list(table.shape)}")
    return table


def read_ijb_meta(root: str | Path, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check the three meta files of IJB-B or IJB-C under ``root``."""
    meta = Path(root) / "meta"
    prefix = target.lower()
    points_path = meta / f"{prefix}_name_5pts_score.txt"
    media_path = meta / f"{prefix}_face_tid_mid.txt"
    pairs_path = meta / f"{prefix}_template_pair_label.txt"
    points = _table(points_path, str, 12)
    medias = _table(media_path, str, 3)
    pairs = _table(pairs_path, np.int64, 3)
    if len(points) != len(medias) or (points[:, 0] != medias[:, 0]).any():
        raise InputError(
            f"{points_path} and {media_path} must list the same images in the same order"
        )
    try:
        numbers = points[:, 1:].astype(np.float32)
        ids = medias[:, 1:].astype(np.int64)
    except ValueError as err:
        raise InputError(
            f"{points_path} or {media_path}: a field is not a number ({err})"
        ) from None
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise InputError(f"{pairs_path}: the third field (label) must be 0 or 1")
    templates = ids[:, 0]
    unknown = np.setdiff1d(pairs[:, :2], templates)
    if len(unknown):
        raise InputError(
            f"{pairs_path} names {len(unknown)} templates that have no image in {media_path} "
            f"(e.g. {unknown[:5].tolist()})"
        )
    return IJBMeta(
        names=points[:, 0].tolist(),
        landmarks=numbers[:, :10].reshape(-1, 5, 2),
        detector_scores=numbers[:, 10],
        templates=templates,
        medias=ids[:, 1],
        pair_templates=pairs[:, :2],
        pair_labels=pairs[:, 2] == 1,
    )


def template_features(
    image_features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    detector_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Template ids (sorted) and their L2-normalised features from image features.

    Image features are L2-normalised, scaled by ``detector_scores`` if given, averaged over
    the images of each (template, media) and the media averages summed per template.
    """
    features = l2_normalize(np.asarray(image_features, dtype=np.float64))
    if detector_scores is not None:
        features = features * np.asarray(detector_scores, dtype=np.float64)[:, None]
    keys, media_of_image = np.unique(
        np.stack([templates, medias], axis=1), axis=0, return_inverse=True
    )
    media_of_image = media_of_image.reshape(-1)
    media_sums = np.zeros((len(keys), features.shape[1]))
    np.add.at(media_sums, media_of_image, features)
    media_means = media_sums / np.bincount(media_of_image, minlength=len(keys))[:, None]
    template_ids, template_of_media = np.unique(keys[:, 0], return_inverse=True)
    template_sums = np.zeros((len(template_ids), features.shape[1]))
    np.add.at(template_sums, template_of_media.reshape(-1), media_means)
    return template_ids, l2_normalize(template_sums)


def pair_scores(
    template_ids: np.ndarray, template_feats: np.ndarray, pair_templates: np.ndarray
) -> np.ndarray:
    """Dot products of the two template features of every pair ``[P, 2]`` of template ids."""
    rows = np.searchsorted(template_ids, pair_templates)
    scores = np.empty(len(pair_templates))
    chunk = 1 << 16
    for start in range(0, len(rows), chunk):
        a, b = rows[start : start + chunk, 0], rows[start : start + chunk, 1]
        scores[start : start + len(a)] = np.einsum("ij,ij->i", template_feats[a], template_feats[b])
    return scores


@dataclass(frozen=True)
class IJBResult:
    """TAR at the standard FARs plus the ROC points the plot draws."""

    target: str
    table: list[TarAtFar]
    roc_far: np.ndarray
    roc_tar: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "tar_at_far": {f"{r.far:g}": r.tar for r in self.table},
            "table": [r.as_dict() for r in self.table],
        }

    def format_table(self) -> str:
        """A two-row text table: the FARs and the TAR (%) at each."""
        head = " | ".join(f"{r.far:>7.0e}" for r in self.table)
        body = " | ".join(f"{100 * r.tar:7.2f}" for r in self.table)
        return f"{'FAR':<6} | {head}\n{self.target:<6} | {body}"


def verify_templates(
    target: str,
    meta: IJBMeta,
    image_features: np.ndarray,
    detector_score: bool = True,
    fars: Sequence[float] = IJB_FARS,
) -> IJBResult:
    """Pool image features into templates, score the pairs and read TAR at each FAR."""
    scores_of = meta.detector_scores if detector_score else None
    ids, feats = template_features(image_features, meta.templates, meta.medias, scores_of)
    scores = pair_scores(ids, feats, meta.pair_templates)
    table = tar_at_far(scores, meta.pair_labels, fars)
    roc = tar_at_far(scores, meta.pair_labels, ROC_FARS)
    return IJBResult(
        target=target,
        table=table,
        roc_far=np.array([r.achieved_far for r in roc]),
        roc_tar=np.array([r.tar for r in roc]),
    )


def evaluate_ijb(
    model: nn.Module,
    root: str | Path,
    target: str = "IJBC",
    batch_size: int = 128,
    device: torch.device | None = None,
    detector_score: bool = True,
    num_workers: int = 0,
) -> IJBResult:
    """IJB-B/C 1:1 verification of ``model`` on the dataset folder ``root``."""
    meta = read_ijb_meta(root, target)
    crops = FaceCrops([Path(root) / "loose_crop" / name for name in meta.names], meta.landmarks)
    loader = torch.utils.data.DataLoader(crops, batch_size=batch_size, num_workers=num_workers)
    features, _ = embed_batches(model, loader, device or torch.device("cpu"), flip=True)
    return verify_templates(target, meta, features, detector_score)


def save_roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Write ROC curves ``{label: (far, tar)}`` with a log FAR axis as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (far, tar) in curves.items():
        axes.semilogx(np.maximum(far, 1e-7), tar, label=label)
    axes.set(xlabel="False accept rate", ylabel="True accept rate", xlim=(1e-6, 1), ylim=(0, 1))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    return path
