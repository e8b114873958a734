"""The data-parallel baseline: every rank holds all class centers; their gradients are summed.

Each rank computes the logits of its own embeddings against every class; the centers'
gradient is summed over ranks as it arrives, so a torch optimizer on each rank takes the
same step. Memory and traffic grow with the number of classes on every rank: this head
exists to be compared with :class:`~facescale.heads.PartialFC`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from facescale.distributed import get_world_size
from facescale.optim import build_optimizer, set_lr, step_unless

from .batch import gather_batch
from .collectives import sum_across_ranks, summed
from .margins import Margin
from .options import check_head_args, resolve_logits_dtype
from .shards import init_centers
from .softmax import dense_shard_terms, log_sum_exp


class DataParallelFC(nn.Module):
    """Full, replicated classification layer; same loss and gradients as PartialFC at rate 1."""

    lean = False  # stepped by a torch optimizer over head.parameters()
    class_start = 0  # every rank holds every class

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        *,
        interclass_filtering_threshold: float = 0.0,
        logits_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        scale_embedding_grad: bool = True,
        num_subcenters: int = 1,
    ) -> None:
        super().__init__()
        check_head_args(
            num_classes, embedding_size, margin, interclass_filtering_threshold, num_subcenters
        )
        if margin.running_state:
            raise ValueError(
                f"head 'data_parallel' does not keep the running state of {type(margin).__name__} "
                "over the global batch; use head 'partial_fc'"
            )
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.threshold = margin, interclass_filtering_threshold
        self.dtype = resolve_logits_dtype(logits_dtype)
        self.num_subcenters = num_subcenters  # rows c * K ... c * K + K - 1 are class c's
        rows = num_classes * num_subcenters
        self.weight = nn.Parameter(init_centers(0, rows, embedding_size, seed))
        self.weight.register_hook(summed)
        self.num_local = num_classes
        # as PartialFC: world_size x the gradient, for the backbone's DDP averaging
        self.embedding_grad_scale = float(get_world_size()) if scale_embedding_grad else 1.0
        self.optimizer: torch.optim.Optimizer | None = None

    def forward(self, embeddings: Tensor, labels: Tensor, sizes: list[int] | None = None) -> Tensor:
        """Mean loss over the global batch (same value on every rank); ``sizes`` as for
        :func:`~facescale.heads.batch.gather_batch`."""
        with torch.autocast(embeddings.device.type, enabled=False):
            batch = gather_batch(
                embeddings,
                labels,
                self.embedding_size,
                self.num_classes,
                gather_embeddings=False,
                grad_scale=self.embedding_grad_scale,
                norms=self.margin.uses_norms,
                norm_grad=self.margin.norm_grad,
                sizes=sizes,
            )
            local = batch.embeddings
            rows = torch.arange(local.shape[0], device=local.device)
            top, sumexp, target = dense_shard_terms(
                local,
                batch.norms,
                self.weight,
                rows,
                labels.to(torch.int64),
                self.margin,
                self.threshold,
                self.dtype,
                across_ranks=False,
                subcenters=self.num_subcenters,
            )
            lse = log_sum_exp(top, sumexp, target, across_ranks=False)
            loss = lse - target
            regulariser = None if batch.norms is None else self.margin.regulariser(batch.norms)
            if regulariser is not None:
                loss = loss + regulariser
            return sum_across_ranks(loss.sum()) / batch.size

    # ---- the training loop's head interface (facescale.heads.TrainableHead) -------------
    def configure_optimizer(
        self, kind: str = "sgd", lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4
    ) -> None:
        """The torch optimizer that :meth:`step` applies to the (summed) gradient."""
        self.optimizer = build_optimizer(kind, self.parameters(), lr, momentum, weight_decay)

    @torch.no_grad()
    def grad_norm_sq(self) -> Tensor:
        """This rank's part of the squared gradient norm: every rank holds the same full
        gradient, so each contributes 1 / world_size of it to the sum over ranks."""
        grads = [p.grad.float().pow(2).sum() for p in self.parameters() if p.grad is not None]
        return torch.stack(grads).sum() / get_world_size()

    @torch.no_grad()
    def step(
        self, lr: float | Tensor, grad_scale: float | Tensor = 1.0, skip: Tensor | None = None
    ) -> None:
        """The optimizer's step on the gradient times ``grad_scale``; none where ``skip`` is set."""
        if self.optimizer is None:
            raise RuntimeError("call head.configure_optimizer(...) before head.step()")
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if isinstance(grad_scale, Tensor) or grad_scale != 1.0:
            torch._foreach_mul_(grads, grad_scale)
        set_lr(self.optimizer, lr)
        if skip is None:
            self.optimizer.step()
        else:
            step_unless(self.optimizer, skip)

    def checkpoint_state(self) -> None:
        """None: the replicated baseline is a speed reference and writes no checkpoints."""
        return None

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        raise RuntimeError("head=data_parallel writes no checkpoints and cannot resume")

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"logits_dtype={self.dtype}, interclass_filtering_threshold={self.threshold}"
        )
