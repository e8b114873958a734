"""The global batch a head computes on: every rank's checked, normalised embeddings and labels.

Each rank's inputs are described in a small table that all ranks share before any other
collective, so a bad input on one rank raises the same clear error on every rank instead
of leaving the others waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from facescale.distributed import get_rank

from .collectives import gather_counts, gather_rows, scale_grad


@dataclass
class GlobalBatch:
    """Embeddings and labels of all ranks, in rank order."""

    embeddings: Tensor  # [global_batch, d] fp32, L2-normalised; gradient returns to its rank
    labels: Tensor  # [global_batch] int64 global class ids
    sizes: list[int]  # rows contributed by each rank
    norms: Tensor | None = None  # [global_batch] fp32 feature norms, when asked for

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def own_rows(self) -> slice:
        """This rank's rows of the gathered batch."""
        start = sum(self.sizes[: get_rank()])
        return slice(start, start + self.sizes[get_rank()])


def _describe(embeddings: Tensor, labels: Tensor) -> list[int]:
    rows, features = (embeddings.shape if embeddings.dim() == 2 else (-1, -1))[:2]
    count = labels.shape[0] if labels.dim() == 1 else -1
    integer = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    return [embeddings.dim(), rows, features, labels.dim(), count, int(integer)]


def _check_shapes(table: Tensor, embedding_size: int) -> None:
    for rank, (emb_dim, rows, features, lab_dim, count, integer) in enumerate(table.tolist()):
        where = f"rank {rank}"
        if emb_dim != 2 or features != embedding_size:
            shape = f"[{rows}, {features}]" if emb_dim == 2 else f"a {emb_dim}-D tensor"
            raise ValueError(
                f"{where}: embeddings are {shape} but this head expects [batch, {embedding_size}]; "
                "the backbone's embedding_size must equal the head's"
            )
        if lab_dim != 1 or count != rows:
            got = f"{count} labels" if lab_dim == 1 else f"a {lab_dim}-D label tensor"
            raise ValueError(
                f"{where}: {got} for {rows} embeddings; pass a 1-D tensor of one class id each"
            )
        if not integer:
            raise ValueError(f"{where}: labels must be an integer tensor of class ids")
    if int(table[:, 1].sum()) == 0:
        raise ValueError("the global batch is empty: every rank passed 0 embeddings")


def _check_labels(labels: Tensor, sizes: list[int], num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0, 0])
    rank, position = 0, index
    while position >= sizes[rank]:
        position -= sizes[rank]
        rank += 1
    raise ValueError(
        f"rank {rank}: label {int(labels[index])} at batch position {position} is outside "
        f"[0, {num_classes}); labels must be class ids below num_classes={num_classes} "
        "(check num_classes against the dataset)"
    )


def gather_batch(
    embeddings: Tensor,
    labels: Tensor,
    embedding_size: int,
    num_classes: int,
    *,
    gather_embeddings: bool = True,
    grad_scale: float = 1.0,
    norms: bool = False,
    norm_grad: bool = False,
    sizes: list[int] | None = None,
) -> GlobalBatch:
    """Check this rank's inputs, normalise the embeddings and gather both from every rank.

    With ``gather_embeddings=False`` only the labels are gathered (every rank's inputs are
    still checked) and ``embeddings`` holds this rank's normalised rows alone. ``sizes``
    (every rank's rows) come from a caller that has checked the shapes and labels where
    they were made: then nothing is checked here and the host never waits for the device.
    The gradient that returns to this rank's ``embeddings`` is multiplied by
    ``grad_scale``. ``norms`` adds the rows' feature norms (gathered alike), with gradient
    if ``norm_grad``.
    """
    if sizes is None:
        table = gather_counts(_describe(embeddings, labels), embeddings.device)
        _check_shapes(table, embedding_size)
        sizes = table[:, 1].tolist()
        all_labels = gather_rows(labels.to(torch.int64), sizes)
        _check_labels(all_labels, sizes, num_classes)
    else:
        all_labels = gather_rows(labels.to(torch.int64), sizes)
    features = scale_grad(embeddings.float(), grad_scale)
    normalised = F.normalize(features, dim=1)
    row_norms = None
    if norms:
        row_norms = torch.linalg.vector_norm(features if norm_grad else features.detach(), dim=1)
    if gather_embeddings:
        normalised = gather_rows(normalised, sizes)
        row_norms = None if row_norms is None else gather_rows(row_norms, sizes)
    return GlobalBatch(normalised, all_labels, sizes, row_norms)
