"""The data-parallel baseline: every rank holds all class centers; their gradients are summed.

Each rank computes the logits of its own embeddings against every class; the centers'
gradient is summed over ranks as it arrives, so a torch optimizer on each rank takes the
same step. Memory and traffic grow with the number of classes on every rank: this head
exists to be compared with :class:`~facescale.heads.PartialFC`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .batch import gather_batch
from .collectives import sum_across_ranks, summed
from .margins import CombinedMargin
from .options import check_head_args, resolve_logits_dtype
from .shards import init_centers
from .softmax import dense_shard_terms, log_sum_exp


class DataParallelFC(nn.Module):
    """Full, replicated classification layer; same loss and gradients as PartialFC at rate 1."""

    lean = False  # always stepped by a torch optimizer over head.parameters()

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        *,
        interclass_filtering_threshold: float = 0.0,
        logits_dtype: torch.dtype | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_head_args(num_classes, embedding_size, margin, interclass_filtering_threshold)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.threshold = margin, interclass_filtering_threshold
        self.dtype = resolve_logits_dtype(logits_dtype)
        self.weight = nn.Parameter(init_centers(0, num_classes, embedding_size, seed))
        self.weight.register_hook(summed)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over the global batch (same value on every rank)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            batch = gather_batch(
                embeddings, labels, self.embedding_size, self.num_classes, gather_embeddings=False
            )
            local = batch.embeddings
            rows = torch.arange(local.shape[0], device=local.device)
            top, sumexp, target = dense_shard_terms(
                local,
                self.weight,
                rows,
                labels.to(torch.int64),
                self.margin,
                self.threshold,
                self.dtype,
            )
            lse = log_sum_exp(top, sumexp, target, across_ranks=False)
            return sum_across_ranks((lse - target).sum()) / batch.size

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"logits_dtype={self.dtype}, interclass_filtering_threshold={self.threshold}"
        )
