"""TAR at FAR for 1:1 verification, exact, from pair lists up to million-image sets (MFR style).

Definitions, shared by every function here:

- A pair's score is the dot product of its two features (the cosine similarity when the
  features are L2-normalised), in float64. Genuine pairs share a label, impostor pairs do not.
  All-to-all takes every unordered pair ``i < j`` of one set; probe-gallery takes every
  (probe, gallery) pair.
- For a FAR ``f`` and ``M`` impostor pairs, ``k = floor(f * M)`` (``f`` read as its decimal
  value, so 1e-6 of 10^6 is exactly 1). The threshold ``t`` is the (k+1)-th largest impostor
  score, counted with multiplicity, and a pair is accepted iff ``score > t``: at most ``k``
  impostors are accepted (fewer only when impostor scores tie at ``t``), and no lower
  threshold keeps that promise. TAR is the accepted fraction of the genuine pairs.

The set-wide functions never hold the score matrix. Scores are computed block by block in
float32 (one matrix multiply per block); with feature norms at most ``a`` and ``b`` and
feature size ``D``, a float32 score is within ``eps = 2 (D + 2) 2^-24 a b`` of the float64 one
(the classic dot-product rounding bound plus the float32 rounding of the features, doubled).
A pool keeps each impostor whose float32 score is at least the running (k+1)-th largest
float32 impostor score minus ``2 eps``; that running value only rises, so the pool ends up
holding every impostor whose float64 score can reach the float64 threshold. The pool is
rescored in float64 and the threshold read from it; genuine pairs are scored in float64, one
batched Gram matrix per class size. Memory: the features, one block of scores, the pool
(about ``k + 1`` pairs) and the genuine scores. Under a process group each rank scans a
share of the row blocks and the pools are gathered, so every rank returns what one process
would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from facescale.distributed import gather_objects, get_rank, get_world_size
from facescale.errors import InputError
from facescale.precision import full_float32

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
PRUNE_AT_LEAST = 1 << 16
RESCORE_CHUNK = 1 << 13
GRAM_CHUNK = 1 << 22  # float64 feature values gathered per batched class Gram product


@dataclass(frozen=True)
class TarAtFar:
    """TAR at one FAR; ``threshold`` is a score, a pair is accepted iff its score is above it."""

    far: float
    threshold: float
    tar: float
    genuine_accepted: int
    genuine: int
    impostors_accepted: int
    impostors: int

    @property
    def achieved_far(self) -> float:
        return self.impostors_accepted / self.impostors

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_far": self.achieved_far}


def impostor_rank(far: float, impostors: int) -> int:
    """``k = floor(far * impostors)``, exact for the decimal value of ``far``."""
    if not 0 < far < 1:
        raise InputError(f"FAR {far!r} must lie strictly between 0 and 1")
    return math.floor(Fraction(repr(float(far))) * impostors)


def tar_from_top_impostors(
    top_impostors: np.ndarray, impostors: int, genuine_scores: np.ndarray, fars: Sequence[float]
) -> list[TarAtFar]:
    """TAR at each FAR from the highest impostor scores and every genuine score.

    ``top_impostors`` must hold, in any order, every impostor score at or above the lowest
    threshold asked for (at least ``k + 1`` values); ``impostors`` is the total count ``M``.
    """
    if impostors == 0 or len(genuine_scores) == 0:
        raise InputError(
            f"TAR@FAR needs genuine and impostor pairs; got {len(genuine_scores)} genuine and "
            f"{impostors} impostor pairs (check the labels)"
        )
    top = np.sort(np.asarray(top_impostors, dtype=np.float64))
    genuine = np.sort(np.asarray(genuine_scores, dtype=np.float64))
    results = []
    for far in fars:
        k = impostor_rank(far, impostors)
        if k >= len(top):
            raise ValueError(f"{len(top)} top impostor scores cannot give FAR {far} (k={k})")
        threshold = top[len(top) - 1 - k]
        genuine_accepted = len(genuine) - int(np.searchsorted(genuine, threshold, "right"))
        results.append(
            TarAtFar(
                far=float(far),
                threshold=float(threshold),
                tar=genuine_accepted / len(genuine),
                genuine_accepted=genuine_accepted,
                genuine=len(genuine),
                impostors_accepted=len(top) - int(np.searchsorted(top, threshold, "right")),
                impostors=impostors,
            )
        )
    return results


def tar_at_far(scores: np.ndarray, genuine: np.ndarray, fars: Sequence[float]) -> list[TarAtFar]:
    """TAR at each FAR for an explicit list of pair scores and genuine flags (e.g. IJB pairs)."""
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine, dtype=bool)
    if scores.shape != genuine.shape or scores.ndim != 1:
        raise ValueError(
            f"scores {list(scores.shape)} and genuine flags {list(genuine.shape)} must be "
            "1-D and of equal length"
        )
    impostor_scores = scores[~genuine]
    return tar_from_top_impostors(impostor_scores, len(impostor_scores), scores[genuine], fars)


@dataclass
class _ImpostorPool:
    """Pairs whose float32 score may still rank among the top ``keep`` impostors in float64.

    A part holds scores and flat indices into a block whose first query row, first ref row
    and width are given; the block scan adds parts as they are (genuine pairs included) and
    :meth:`prune` decodes, drops genuine pairs and low scores, all parts in one pass.
    """

    keep: int
    slack: float
    query_labels: torch.Tensor
    ref_labels: torch.Tensor
    cutoff: float = -math.inf
    parts: list[tuple[torch.Tensor, torch.Tensor, int, int, int]] = field(default_factory=list)
    size: int = 0

    def raise_cutoff(self, kth_largest: float) -> None:
        self.cutoff = max(self.cutoff, kth_largest - self.slack)

    def add(
        self, scores: torch.Tensor, index: torch.Tensor, row: int, col: int, width: int
    ) -> None:
        self.parts.append((scores, index, row, col, width))
        self.size += len(scores)
        if self.size >= 2 * self.keep + PRUNE_AT_LEAST:
            self.prune()

    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, query rows and ref rows of every pair in the parts."""
        if not self.parts:  # a rank that was given no blocks
            device = self.query_labels.device
            no_pairs = torch.empty(0, dtype=torch.long, device=device)
            return torch.empty(0, device=device), no_pairs, no_pairs
        scores, index, *origins = zip(*self.parts, strict=True)
        lengths = torch.tensor([len(part) for part in scores], device=index[0].device)
        row, col, width = (
            torch.tensor(values, device=index[0].device).repeat_interleave(lengths)
            for values in origins
        )
        index = torch.cat(index)
        return torch.cat(scores), row + index // width, col + index % width

    def prune(self) -> None:
        """Keep only impostor pairs at or above the (k+1)-th largest score minus slack."""
        scores, rows, cols = self._decoded()
        impostor = self.query_labels[rows] != self.ref_labels[cols]
        scores, rows, cols = scores[impostor], rows[impostor], cols[impostor]
        if len(scores) >= self.keep:
            self.raise_cutoff(torch.kthvalue(scores, len(scores) - self.keep + 1).values.item())
            kept = scores >= self.cutoff
            scores, rows, cols = scores[kept], rows[kept], cols[kept]
        width = len(self.ref_labels)
        self.parts = [(scores, rows * width + cols, 0, 0, width)]
        self.size = len(scores)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The surviving impostor pairs: scores, query rows, ref rows."""
        self.prune()
        return self._decoded()


def _as_features(name: str, features: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(features)
    if tensor.ndim != 2 or len(tensor) == 0 or not tensor.is_floating_point():
        raise InputError(
            f"{name}: expected float features [N, D] with N >= 1, got "
            f"{tensor.dtype} {list(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name}: features contain NaN or infinity")
    return tensor


def _as_labels(name: str, labels: np.ndarray | torch.Tensor, count: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != count or array.dtype.kind not in "iu":
        raise InputError(
            f"{name}: expected {count} integer labels (one per feature row), got "
            f"{array.dtype} {list(array.shape)}"
        )
    return array.astype(np.int64)


def _max_norm(features: torch.Tensor) -> float:
    """The largest row L2 norm, in float64, a chunk of rows at a time."""
    chunks = features.split(RESCORE_CHUNK)
    return max(chunk.double().norm(dim=1).max().item() for chunk in chunks)


def _score_error_bound(queries: torch.Tensor, refs: torch.Tensor) -> float:
    """``eps`` of the module docstring: how far a float32 score can be from the float64 one."""
    dim = queries.shape[1]
    return 2.0 * (dim + 2) * FLOAT32_UNIT_ROUNDOFF * _max_norm(queries) * _max_norm(refs)


def _scan_blocks(
    pool: _ImpostorPool, queries: torch.Tensor, refs: torch.Tensor, block: int, upper: bool
) -> None:
    """Feed this rank's share of the float32 scores above the pool's cutoff into ``pool``.

    Row block ``b`` belongs to rank ``b % world``; with ``upper`` only pairs ``i < j`` count.
    Per block: one matrix product, one comparison, one nonzero and one gather.
    """
    buffer = torch.empty(block * block, dtype=torch.float32, device=queries.device)
    hit_buffer = torch.empty(block * block, dtype=torch.bool, device=queries.device)
    lower_triangle = torch.ones(block, block, dtype=torch.bool, device=queries.device).tril()
    rank, world = get_rank(), get_world_size()
    for row_block, q_start in enumerate(range(0, len(queries), block)):
        if row_block % world != rank:
            continue
        q = queries[q_start : q_start + block]
        for r_start in range(q_start if upper else 0, len(refs), block):
            r = refs[r_start : r_start + block]
            flat = buffer[: len(q) * len(r)]
            scores = torch.mm(q, r.T, out=flat.view(len(q), len(r)))
            if upper and r_start == q_start:
                scores.masked_fill_(lower_triangle[: len(q), : len(r)], -math.inf)
            if pool.cutoff == -math.inf:
                _mask_genuine_and_seed_cutoff(pool, scores, q_start, r_start)
            hits = hit_buffer[: len(flat)]
            if pool.cutoff == -math.inf:
                torch.gt(flat, -math.inf, out=hits)
            else:
                torch.ge(flat, pool.cutoff, out=hits)
            found = hits.nonzero().view(-1)
            pool.add(flat.index_select(0, found), found, q_start, r_start, len(r))


def _mask_genuine_and_seed_cutoff(
    pool: _ImpostorPool, scores: torch.Tensor, q_start: int, r_start: int
) -> None:
    """Until the pool has a cutoff: hide a block's genuine pairs, and take the block's own
    ``keep``-th largest impostor score (a lower bound of the final one) as a first cutoff."""
    q_labels = pool.query_labels[q_start : q_start + scores.shape[0]]
    r_labels = pool.ref_labels[r_start : r_start + scores.shape[1]]
    scores.masked_fill_(q_labels[:, None] == r_labels[None, :], -math.inf)
    if scores.numel() >= pool.keep:
        kth = torch.kthvalue(scores.view(-1), scores.numel() - pool.keep + 1).values
        pool.raise_cutoff(kth.item())


def _gather_pool(pool: _ImpostorPool) -> None:
    """Pool every rank's candidates on every rank (a no-op without a process group)."""
    if get_world_size() == 1:
        return
    pool.prune()
    scores, codes, *_ = pool.parts[0]
    gathered = gather_objects((scores.cpu(), codes.cpu()))
    width = len(pool.ref_labels)
    device = pool.ref_labels.device
    pool.parts = [(s.to(device), c.to(device), 0, 0, width) for s, c in gathered]
    pool.size = sum(len(s) for s, _ in gathered)


def _pair_scores64(
    queries: torch.Tensor, refs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> np.ndarray:
    """float64 dot products of the listed (query row, ref row) pairs, in bounded chunks."""
    rows, cols = rows.to(queries.device), cols.to(refs.device)
    out = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), RESCORE_CHUNK):
        r, c = rows[start : start + RESCORE_CHUNK], cols[start : start + RESCORE_CHUNK]
        out[start : start + len(r)] = (queries[r].double() * refs[c].double()).sum(1).cpu()
    return out.numpy()


def _classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted classes, each one's first position and size in ``order``, and ``order`` (the
    rows sorted by label)."""
    order = np.argsort(labels, kind="stable")
    classes, first, size = np.unique(labels[order], return_index=True, return_counts=True)
    return classes, first, size, order


def genuine_scores(
    queries: torch.Tensor,
    query_labels: np.ndarray,
    refs: torch.Tensor,
    ref_labels: np.ndarray,
    same_set: bool,
) -> np.ndarray:
    """float64 scores of every genuine pair, one batched Gram matrix per class-size group.

    ``same_set``: queries and refs are one set and only pairs ``i < j`` count.
    """
    q_classes, q_first, q_size, q_order = _classes(query_labels)
    r_classes, r_first, r_size, r_order = _classes(ref_labels)
    _, q_index, r_index = np.intersect1d(q_classes, r_classes, return_indices=True)
    sizes = np.stack([q_size[q_index], r_size[r_index]], axis=1)
    scores = [torch.empty(0, dtype=torch.float64)]
    for p, g in np.unique(sizes, axis=0):
        group = (sizes == (p, g)).all(axis=1)
        q_rows = q_order[q_first[q_index[group]][:, None] + np.arange(p)]
        r_rows = r_order[r_first[r_index[group]][:, None] + np.arange(g)]
        upper = torch.triu_indices(p, g, offset=1)
        step = max(1, GRAM_CHUNK // ((p + g) * queries.shape[1]))
        for start in range(0, len(q_rows), step):
            q = queries[torch.as_tensor(q_rows[start : start + step])].double()
            r = refs[torch.as_tensor(r_rows[start : start + step])].double()
            gram = torch.bmm(q, r.transpose(1, 2))
            scores.append((gram[:, upper[0], upper[1]] if same_set else gram).reshape(-1).cpu())
    return torch.cat(scores).numpy()


def _blockwise(
    queries: torch.Tensor,
    query_labels: np.ndarray,
    refs: torch.Tensor,
    ref_labels: np.ndarray,
    fars: Sequence[float],
    block: int,
    device: torch.device | None,
    upper: bool,
) -> list[TarAtFar]:
    genuine = genuine_scores(queries, query_labels, refs, ref_labels, same_set=upper)
    pairs = len(queries) * (len(queries) - 1) // 2 if upper else len(queries) * len(refs)
    impostors = pairs - len(genuine)
    if impostors == 0 or len(genuine) == 0:
        raise InputError(
            f"TAR@FAR needs genuine and impostor pairs; these labels give {len(genuine)} "
            f"genuine and {impostors} impostor pairs"
        )
    keep = max(impostor_rank(far, impostors) for far in fars) + 1
    device = device or queries.device
    pool = _ImpostorPool(
        keep=keep,
        slack=2.0 * _score_error_bound(queries, refs),
        query_labels=torch.as_tensor(query_labels, device=device),
        ref_labels=torch.as_tensor(ref_labels, device=device),
    )
    with full_float32():
        _scan_blocks(
            pool, queries.to(device, torch.float32), refs.to(device, torch.float32), block, upper
        )
    _gather_pool(pool)
    _, rows, cols = pool.merged()
    top_impostors = _pair_scores64(queries, refs, rows, cols)
    return tar_from_top_impostors(top_impostors, impostors, genuine, fars)


def tar_at_far_all_pairs(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    fars: Sequence[float] = (1e-6,),
    block: int = 4096,
    device: torch.device | None = None,
) -> list[TarAtFar]:
    """All-to-all TAR at each FAR over every pair ``i < j`` of ``features`` ``[N, D]``."""
    features = _as_features("features", features)
    labels = _as_labels("labels", labels, len(features))
    return _blockwise(features, labels, features, labels, fars, block, device, upper=True)


def tar_at_far_probe_gallery(
    probe: np.ndarray | torch.Tensor,
    probe_labels: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    gallery_labels: np.ndarray | torch.Tensor,
    fars: Sequence[float] = (1e-4,),
    block: int = 4096,
    device: torch.device | None = None,
) -> list[TarAtFar]:
    """TAR at each FAR over every (probe, gallery) pair, e.g. masked probes vs unmasked gallery."""
    probe = _as_features("probe", probe)
    gallery = _as_features("gallery", gallery)
    if probe.shape[1] != gallery.shape[1]:
        raise InputError(
            f"probe features have {probe.shape[1]} dimensions, gallery features {gallery.shape[1]}"
        )
    probe_labels = _as_labels("probe labels", probe_labels, len(probe))
    gallery_labels = _as_labels("gallery labels", gallery_labels, len(gallery))
    return _blockwise(
        probe, probe_labels, gallery, gallery_labels, fars, block, device, upper=False
    )
