"""Memory-lean margin softmax: class chunks only, never a [batch x shard] logit matrix.

Forward streams the shard's (sampled) centers in chunks and keeps, per row, an online
maximum, the sum of exponentials and, when training, the softmax-weighted sum of the
centers, so the gradient to the embeddings is complete when forward ends (one more matmul
per chunk, as in flash attention). Backward appends a :class:`MicroBatch` to the head's
``pending`` list; the centers' gradient is made from it chunk by chunk when the head steps.
Given a cache (a [batch x classes] buffer the head grants while it fits its memory
budget), forward keeps the softmax probabilities there and the update needs one matmul per
chunk; without one the update recomputes the logits (a fourth matmul pass).

Chunks use raw center rows and scale the logits by the rows' inverse norms (no normalised
copy of the centers), and their buffers are reused across chunks and steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .collectives import sum_across_ranks
from .margins import CombinedMargin
from .rows import Rows, Scratch
from .sampling import ShardSelection
from .softmax import drop_filtered_, finite_or_zero, inverse_norms, log_sum_exp, target_cosine


def matmul_into(out: Tensor, a: Tensor, b: Tensor, alpha: float, accumulate: bool) -> Tensor:
    """``out = alpha * (a @ b)``, plus ``out`` if ``accumulate``; fp32 ``out``, any-dtype a, b."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b, beta=1.0 if accumulate else 0.0, alpha=alpha)
    product = torch.mm(a, b).float()
    return out.add_(product, alpha=alpha) if accumulate else torch.mul(product, alpha, out=out)


@dataclass
class MicroBatch:
    """What one backward leaves for the centers' update."""

    embeddings: Tensor  # [global_batch, d] normalised, fp32, detached
    scaled: Tensor  # s * embeddings in the logits dtype
    lse: Tensor  # [global_batch] log-sum-exp over all ranks' classes
    selection: ShardSelection
    target_coef: Tensor  # per target (selection order): d(row loss) / d(target cosine)
    probs: Tensor | None  # [global_batch, computed classes] softmax, targets 0; or recompute
    upstream: Tensor  # the loss's incoming gradient (0-d, on the device)

    @property
    def index(self) -> Tensor | None:
        return self.selection.index


@dataclass(frozen=True)
class ChunkedSoftmax:
    """The margin softmax of one shard, computed ``chunk_size`` classes at a time."""

    margin: CombinedMargin
    threshold: float
    dtype: torch.dtype
    chunk_size: int

    def chunks(self, count: int) -> Iterator[tuple[int, int]]:
        for lo in range(0, count, self.chunk_size):
            yield lo, min(lo + self.chunk_size, count)

    def scale(self, embeddings: Tensor) -> Tensor:
        """``s * embeddings`` in the logits dtype: one matmul with it gives the logits."""
        return (embeddings * self.margin.s).to(self.dtype)

    def centers(self, weight: Tensor, rows: Rows, scratch: Scratch) -> tuple[Tensor, Tensor]:
        """Raw center rows (a view, or a copy in ``scratch``) and their inverse norms."""
        block = scratch.rows_of("rows", weight, rows)
        return block, inverse_norms(block)

    def _logits(
        self,
        scaled: Tensor,
        block: Tensor,
        inv_norm: Tensor,
        sel: ShardSelection,
        lo: int,
        scratch: Scratch,
        out: Tensor | None = None,
    ) -> Tensor:
        """Non-target logits of columns [lo, lo + len(block)), in ``out`` or scratch; targets
        are -inf."""
        if out is None:
            out = scratch.take("logits", (scaled.shape[0], block.shape[0]), inv_norm)
        logits = matmul_into(out, scaled, block.to(self.dtype).t(), 1.0, accumulate=False)
        drop_filtered_(logits.mul_(inv_norm), self.margin.s * self.threshold)
        inside, cols = sel.chunk_targets(lo, lo + block.shape[0])
        at = (sel.target_rows, cols)  # distinct rows: no position is written twice
        logits.index_put_(at, torch.where(inside, float("-inf"), logits[at]))
        return logits

    def _targets(
        self, weight: Tensor, embeddings: Tensor, sel: ShardSelection
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised target centers, their margin logits and the margin's derivative."""
        centers = F.normalize(weight[sel.target_local], dim=1)
        with torch.enable_grad():
            cosine = target_cosine(embeddings[sel.target_rows], centers).requires_grad_()
            logits = self.margin(cosine)
            (slope,) = torch.autograd.grad(logits.sum(), cosine)
        return centers, logits.detach(), slope

    def forward(
        self,
        weight: Tensor,
        embeddings: Tensor,
        sel: ShardSelection,
        embedding_grad: bool,
        scratch: Scratch,
        cache: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(loss, lse, target_coef, grad)``: the mean loss over the global batch and, with
        ``embedding_grad``, its gradient to this shard's part of ``embeddings``. A ``cache``
        of shape [batch, sel.count] receives the softmax probabilities of the columns."""
        rows, batch = sel.target_rows, embeddings.shape[0]
        scaled = self.scale(embeddings)
        target_centers, local_target, slope = self._targets(weight, embeddings, sel)
        # distinct rows: index_add_ into zeros places them exactly, and has a deterministic
        # CUDA kernel (index_copy_ has none)
        target = sum_across_ranks(embeddings.new_zeros(batch).index_add_(0, rows, local_target))
        top = embeddings.new_full((batch,), float("-inf"))
        sumexp = embeddings.new_zeros(batch)
        weighted = torch.zeros_like(embeddings) if embedding_grad else None
        tops = []  # per chunk: the running maximum its probabilities are relative to
        for lo, hi in self.chunks(sel.count):
            block, inv_norm = self.centers(weight, shard_rows(sel.index, lo, hi), scratch)
            out = None if cache is None else cache[:, lo:hi]
            logits = self._logits(scaled, block, inv_norm, sel, lo, scratch, out)
            new_top = torch.maximum(top, logits.amax(dim=1))
            shift = finite_or_zero(new_top)
            rescale = torch.exp(top - shift)
            probs = logits.sub_(shift[:, None]).exp_()  # relative to this chunk's shift
            sumexp.mul_(rescale).add_(probs.sum(dim=1))
            if weighted is not None:
                if cache is None:
                    scaled_probs = probs.mul_(inv_norm)
                else:
                    buffer = scratch.take("scaled_probs", tuple(probs.shape), probs)
                    scaled_probs = torch.mul(probs, inv_norm, out=buffer)
                weighted.mul_(rescale[:, None])
                matmul_into(weighted, scaled_probs.to(self.dtype), block.to(self.dtype), 1.0, True)
            tops.append(new_top)
            top = new_top
        lse = log_sum_exp(top, sumexp, target, across_ranks=True)
        if cache is not None:
            # -inf (no logit yet) gives 0, never exp(0 - lse) overflowing for a very low lse
            for (lo, hi), chunk_top in zip(self.chunks(sel.count), tops, strict=True):
                cache[:, lo:hi].mul_(torch.exp(chunk_top - lse)[:, None])
        loss = (lse - target).sum() / batch
        target_coef = (torch.exp(local_target - lse[rows]) - 1.0) * slope
        if weighted is None:
            return loss, lse, target_coef, None
        grad = weighted.mul_((self.margin.s * torch.exp(top - lse))[:, None])
        grad.index_add_(0, rows, target_coef[:, None] * target_centers)
        return loss, lse, target_coef, grad.div_(batch)

    def add_center_grad(
        self,
        mb: MicroBatch,
        block: Tensor,
        inv_norm: Tensor,
        lo: int,
        out: Tensor,
        scratch: Scratch,
    ) -> Tensor:
        """Gradient of ``mb``'s loss (times its upstream gradient, a device tensor) to the
        normalised centers ``block * inv_norm`` (columns [lo, lo + len(block)) of ``mb``),
        written into ``out``."""
        sel = mb.selection
        if mb.probs is not None:
            probs = mb.probs[:, lo : lo + block.shape[0]]
        else:
            logits = self._logits(mb.scaled, block, inv_norm, sel, lo, scratch)
            probs = logits.sub_(mb.lse[:, None]).exp_()
        scale = 1.0 / mb.embeddings.shape[0]
        matmul_into(out, probs.t().to(self.dtype), mb.scaled, scale, accumulate=False)
        inside, cols = sel.chunk_targets(lo, lo + block.shape[0])
        coef = (mb.target_coef * scale)[:, None] * mb.embeddings[sel.target_rows]
        out.index_add_(0, cols, torch.where(inside[:, None], coef, 0.0))  # outside: exact 0
        return out.mul_(mb.upstream)


def raw_center_grad_(grad: Tensor, block: Tensor, inv_norm: Tensor, scratch: Scratch) -> Tensor:
    """Turn, in place, the gradient to normalised rows ``block * inv_norm`` into the gradient
    to ``block``: ``inv_norm * grad - block * inv_norm**3 * (block . grad)``."""
    product = torch.mul(block, grad, out=scratch.take("product", tuple(grad.shape), grad))
    radial = product.sum(dim=1).mul_(inv_norm.pow(3))
    return grad.mul_(inv_norm[:, None]).addcmul_(block, radial[:, None], value=-1.0)


def shard_rows(index: Tensor | None, lo: int, hi: int) -> Rows:
    """Rows of the shard behind computed columns [lo, hi)."""
    return slice(lo, hi) if index is None else index[lo:hi]


class _LeanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, sel, softmax, pending, embedding_grad, scratch, cache):
        loss, lse, target_coef, grad = softmax.forward(
            weight, embeddings, sel, embedding_grad, scratch, cache
        )
        ctx.grad, ctx.pending = grad, pending
        scaled = softmax.scale(embeddings)
        ctx.micro_batch = (embeddings.detach(), scaled, lse, sel, target_coef, cache)
        return loss

    @staticmethod
    def backward(ctx, upstream):
        ctx.pending.append(MicroBatch(*ctx.micro_batch, upstream=upstream.detach()))
        grad = None if ctx.grad is None else ctx.grad * upstream
        return grad, None, None, None, None, None, None, None


def lean_loss(
    embeddings: Tensor,
    weight: Tensor,
    sel: ShardSelection,
    softmax: ChunkedSoftmax,
    pending: list[MicroBatch],
    scratch: Scratch,
    cache: Tensor | None = None,
) -> Tensor:
    """Mean loss over the global batch; its backward appends a :class:`MicroBatch` to ``pending``.

    ``embeddings`` are the gathered, normalised global batch. Without grad mode nothing is
    recorded; embeddings that do not require grad still let the centers learn. ``cache``
    ([batch, sel.count], fp32) keeps the probabilities for the update.
    """
    if not torch.is_grad_enabled():
        return softmax.forward(weight, embeddings, sel, False, scratch)[0]
    embedding_grad = embeddings.requires_grad
    if not embedding_grad:
        embeddings = embeddings.detach().requires_grad_()
    return _LeanLoss.apply(
        embeddings, weight, sel, softmax, pending, embedding_grad, scratch, cache
    )
