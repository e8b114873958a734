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

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .collectives import sum_across_ranks
from .margins import Margin
from .rows import Rows, Scratch
from .sampling import ShardSelection
from .softmax import (
    drop_filtered_,
    finite_or_zero,
    inverse_norms,
    log_sum_exp,
    observe_batch,
    target_cosine,
)
from .subcenters import best_of, pick_subcenters, spread


@functools.cache
def writes_fp32_products(device: torch.device) -> bool:
    """Whether ``torch.mm`` on ``device`` writes the fp32 product of 16-bit operands straight
    from its accumulator (``out_dtype``: CUDA only), with no 16-bit product to widen."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def matmul_into(out: Tensor, a: Tensor, b: Tensor, alpha: float, accumulate: bool) -> Tensor:
    """``out = alpha * (a @ b)``, plus ``out`` if ``accumulate``; fp32 ``out``, any-dtype a, b."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b, beta=1.0 if accumulate else 0.0, alpha=alpha)
    if not writes_fp32_products(a.device):
        product = torch.mm(a, b).float()
    elif accumulate or alpha != 1.0 or not out.is_contiguous():
        product = torch.mm(a, b, out_dtype=out.dtype)
    else:
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return out.add_(product, alpha=alpha) if accumulate else torch.mul(product, alpha, out=out)


@dataclass(frozen=True)
class Negatives:
    """What modulated a forward's negative logits: every row's target logit and the
    margin's state then (so a later recompute modulates them alike)."""

    target: Tensor  # [global_batch]
    state: Tensor


@dataclass
class MicroBatch:
    """What one backward leaves for the centers' update."""

    embeddings: Tensor  # [global_batch, d] normalised, fp32, detached
    scaled: Tensor  # s * embeddings in the logits dtype
    lse: Tensor  # [global_batch] log-sum-exp over all ranks' classes
    selection: ShardSelection
    target_coef: Tensor  # per target (selection order): d(row loss) / d(target cosine)
    probs: Tensor | None  # [global_batch, computed classes] softmax, targets 0; or recompute
    negatives: Negatives | None  # how the negative logits were modulated (None: not at all)
    upstream: Tensor  # the loss's incoming gradient (0-d, on the device)

    @property
    def index(self) -> Tensor | None:
        return self.selection.index


@dataclass
class ChunkedResult:
    """What a chunked forward gives: the loss, what the update needs, and the gradients."""

    loss: Tensor
    lse: Tensor  # [global_batch] log-sum-exp over all ranks' classes
    selection: ShardSelection  # the targets' sub-centers chosen
    target_coef: Tensor
    negatives: Negatives | None
    grad: Tensor | None = None  # to this shard's part of the normalised embeddings
    norm_grad: Tensor | None = None  # to this shard's part of the feature norms


@dataclass(frozen=True)
class ChunkedSoftmax:
    """The margin softmax of one shard, computed ``chunk_size`` classes at a time.

    Columns are center rows: ``subcenters`` consecutive rows per class (a class's logit is
    its best sub-center's), so a chunk is ``chunk_size * subcenters`` rows."""

    margin: Margin
    threshold: float
    dtype: torch.dtype
    chunk_size: int
    subcenters: int = 1

    def chunks(self, count: int) -> Iterator[tuple[int, int]]:
        """Row ranges of ``chunk_size`` whole classes over ``count`` computed rows."""
        step = self.chunk_size * self.subcenters
        for lo in range(0, count, step):
            yield lo, min(lo + step, count)

    def scale(self, embeddings: Tensor) -> Tensor:
        """``s * embeddings`` in the logits dtype: one matmul with it gives the logits."""
        return (embeddings * self.margin.s).to(self.dtype)

    def centers(self, weight: Tensor, rows: Rows, scratch: Scratch) -> tuple[Tensor, Tensor]:
        """Raw fp32 center rows (a view, or a copy in ``scratch``) and their inverse norms."""
        block = scratch.wide_rows("rows", weight, rows)
        return block, inverse_norms(block)

    def operand(
        self, block: Tensor, inv_norm: Tensor, scratch: Scratch
    ) -> tuple[Tensor, Tensor | None]:
        """The centers as the logit matmuls take them, and the inverse norms still owed to the
        logits (None: none). In a narrower logits dtype the rows are normalised on their way
        to it (that pass is made anyway), which saves a pass over the [batch x chunk] logits;
        in fp32, the raw rows (often a view of the table, no copy at all)."""
        if self.dtype == block.dtype:
            return block, inv_norm
        out = scratch.take("operand", tuple(block.shape), block, self.dtype)
        return torch.mul(block, inv_norm[:, None], out=out), None

    def _logits(
        self,
        scaled: Tensor,
        operand: Tensor,
        inv_norm: Tensor | None,
        sel: ShardSelection,
        lo: int,
        scratch: Scratch,
        out: Tensor | None = None,
        negatives: Negatives | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Non-target logits of the classes of rows [lo, lo + len(operand)) (``operand`` and
        ``inv_norm`` from :meth:`operand`), in ``out`` or scratch (with sub-centers: in a new
        tensor, the best sub-center of each class third, else None); targets are -inf. With
        ``negatives`` they are modulated in place, and the derivative of the modulated
        logits to the plain ones comes second (else None)."""
        if out is None:
            out = scratch.take("logits", (scaled.shape[0], operand.shape[0]), scaled, torch.float32)
        logits = matmul_into(out, scaled, operand.t(), 1.0, accumulate=False)
        if inv_norm is not None:
            logits.mul_(inv_norm)
        k, best = self.subcenters, None
        if k > 1:
            logits, best = best_of(logits, k)
        drop_filtered_(logits, self.margin.s * self.threshold)
        inside, cols = sel.chunk_targets(lo, lo + operand.shape[0])
        at = (sel.target_rows, cols // k)  # distinct rows: no position is written twice
        logits.index_put_(at, torch.where(inside, float("-inf"), logits[at]))
        if negatives is None:
            return logits, None, best
        slope = scratch.take("slope", tuple(logits.shape), logits)
        work = scratch.take("modulation", tuple(logits.shape), logits)
        self.margin.modulate_(logits, negatives.target, negatives.state, slope, work)
        return logits, slope, best

    def _targets(
        self,
        weight: Tensor,
        embeddings: Tensor,
        norms: Tensor | None,
        sel: ShardSelection,
        training: bool,
    ) -> tuple[ShardSelection, Tensor, Tensor, Tensor, Tensor | None]:
        """``sel`` with each target's best sub-center chosen, the normalised target centers,
        their margin logits and the margin's derivatives to the target cosines and (when it
        differentiates through them) the feature norms, all three 0 for placeholders; a
        ``training`` forward first lets the margin observe the batch."""
        if self.subcenters > 1:
            group = sel.target_local[:, None] + torch.arange(self.subcenters, device=weight.device)
            candidates = F.normalize(weight[group].float(), dim=2)
            cosines = (candidates * embeddings[sel.target_rows][:, None, :].float()).sum(dim=2)
            sel = pick_subcenters(sel, cosines.argmax(dim=1))
        centers = F.normalize(weight[sel.target_local].float(), dim=1)
        cosine = target_cosine(embeddings[sel.target_rows], centers)
        rows, batch = sel.target_rows, embeddings.shape[0]
        observe_batch(self.margin, norms, sel.masked(cosine), rows, batch, training)
        row_norms = None if norms is None else norms[sel.target_rows].detach()
        with torch.enable_grad():
            inputs = [cosine.requires_grad_()]
            if self.margin.norm_grad:
                inputs.append(row_norms.requires_grad_())
            logits = self.margin.target_logit(cosine, row_norms)
            slopes = torch.autograd.grad(logits.sum(), inputs)
        norm_slope = sel.masked(slopes[1]) if self.margin.norm_grad else None
        return sel, centers, sel.masked(logits.detach()), sel.masked(slopes[0]), norm_slope

    def forward(
        self,
        weight: Tensor,
        embeddings: Tensor,
        norms: Tensor | None,
        sel: ShardSelection,
        embedding_grad: bool,
        scratch: Scratch,
        cache: Tensor | None = None,
        training: bool = False,
    ) -> ChunkedResult:
        """The mean loss over the global batch of a ``training`` forward (or not: the
        margin's running state stays as it is) and, with ``embedding_grad``, its gradient to
        this shard's part of ``embeddings`` (and of ``norms``, the feature norms, for a margin
        that differentiates through them). A ``cache`` of shape [batch, sel.count] receives
        the softmax probabilities of the columns (times the negatives' modulation slope)."""
        batch = embeddings.shape[0]
        scaled = self.scale(embeddings)
        sel, target_centers, local_target, slope, norm_slope = self._targets(
            weight, embeddings, norms, sel, training
        )
        rows = sel.target_rows
        # distinct rows: index_add_ into zeros places them exactly, and has a deterministic
        # CUDA kernel (index_copy_ has none)
        target = sum_across_ranks(embeddings.new_zeros(batch).index_add_(0, rows, local_target))
        state = self.margin.negative_state()
        negatives = None if state is None else Negatives(target, state)
        top = embeddings.new_full((batch,), float("-inf"))
        sumexp = embeddings.new_zeros(batch)
        weighted = torch.zeros_like(embeddings) if embedding_grad else None
        tops = []  # per chunk: the running maximum its probabilities are relative to
        for lo, hi in self.chunks(sel.count):
            block, inv_norm = self.centers(weight, shard_rows(sel.index, lo, hi), scratch)
            operand, inv_norm = self.operand(block, inv_norm, scratch)
            out = None if cache is None else cache[:, lo:hi]
            logits, slopes, best = self._logits(
                scaled, operand, inv_norm, sel, lo, scratch, out, negatives
            )
            new_top = torch.maximum(top, logits.amax(dim=1))
            shift = finite_or_zero(new_top)
            rescale = torch.exp(top - shift)
            probs = logits.sub_(shift[:, None]).exp_()  # relative to this chunk's shift
            sumexp.mul_(rescale).add_(probs.sum(dim=1))
            if slopes is not None:
                probs.mul_(slopes)  # from here on: d(loss) / d(plain logit), unnormalised
            if best is not None:  # onto the rows: each class's best sub-center
                if out is None:
                    out = scratch.take("spread", (batch, block.shape[0]), probs)
                probs = spread(probs, best, self.subcenters, out)
            if weighted is not None:
                scaled_probs = probs  # times the inverse norms, or the operand's rows have them
                if inv_norm is not None and cache is None:
                    scaled_probs = probs.mul_(inv_norm)
                elif inv_norm is not None:
                    buffer = scratch.take("scaled_probs", tuple(probs.shape), probs)
                    scaled_probs = torch.mul(probs, inv_norm, out=buffer)
                weighted.mul_(rescale[:, None])
                matmul_into(weighted, scaled_probs.to(self.dtype), operand, 1.0, True)
            tops.append(new_top)
            top = new_top
        lse = log_sum_exp(top, sumexp, target, across_ranks=True)
        if cache is not None:
            # -inf (no logit yet) gives 0, never exp(0 - lse) overflowing for a very low lse
            for (lo, hi), chunk_top in zip(self.chunks(sel.count), tops, strict=True):
                cache[:, lo:hi].mul_(torch.exp(chunk_top - lse)[:, None])
        loss = (lse - target).sum() / batch
        target_weight = torch.exp(local_target - lse[rows]) - 1.0
        target_coef = target_weight * slope
        result = ChunkedResult(loss, lse, sel, target_coef, negatives)
        if weighted is None:
            return result
        grad = weighted.mul_((self.margin.s * torch.exp(top - lse))[:, None])
        grad.index_add_(0, rows, target_coef[:, None] * target_centers)
        result.grad = grad.div_(batch)
        if norm_slope is not None:
            coef = target_weight * norm_slope / batch
            result.norm_grad = embeddings.new_zeros(batch).index_add_(0, rows, coef)
        return result

    def add_center_grad(
        self,
        mb: MicroBatch,
        block: Tensor | None,
        inv_norm: Tensor | None,
        lo: int,
        out: Tensor,
        scratch: Scratch,
    ) -> Tensor:
        """Gradient of ``mb``'s loss (times its upstream gradient, a device tensor) to the
        normalised centers ``block * inv_norm`` (columns [lo, lo + len(out)) of ``mb``),
        written into ``out``; the centers are read only where ``mb`` kept no probabilities
        (else they may be None)."""
        sel, count = mb.selection, out.shape[0]
        if mb.probs is not None:
            probs = mb.probs[:, lo : lo + count]
        else:
            operand, owed = self.operand(block, inv_norm, scratch)
            logits, slopes, best = self._logits(
                mb.scaled, operand, owed, sel, lo, scratch, negatives=mb.negatives
            )
            probs = logits.sub_(mb.lse[:, None]).exp_()
            if slopes is not None:
                probs.mul_(slopes)
            if best is not None:
                shape = (probs.shape[0], count)
                probs = spread(probs, best, self.subcenters, scratch.take("spread", shape, probs))
        scale = 1.0 / mb.embeddings.shape[0]
        matmul_into(out, probs.t().to(self.dtype), mb.scaled, scale, accumulate=False)
        inside, cols = sel.chunk_targets(lo, lo + count)
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
    def forward(
        ctx, embeddings, norms, weight, sel, softmax, pending, embedding_grad, scratch, cache
    ):
        result = softmax.forward(
            weight, embeddings, norms, sel, embedding_grad, scratch, cache, training=True
        )
        ctx.grad, ctx.norm_grad, ctx.pending = result.grad, result.norm_grad, pending
        scaled = softmax.scale(embeddings)
        ctx.micro_batch = (
            embeddings.detach(),
            scaled,
            result.lse,
            result.selection,
            result.target_coef,
            cache,
            result.negatives,
        )
        return result.loss

    @staticmethod
    def backward(ctx, upstream):
        ctx.pending.append(MicroBatch(*ctx.micro_batch, upstream=upstream.detach()))
        grad = None if ctx.grad is None else ctx.grad * upstream
        norm_grad = None if ctx.norm_grad is None else ctx.norm_grad * upstream
        return grad, norm_grad, None, None, None, None, None, None, None


def lean_loss(
    embeddings: Tensor,
    norms: Tensor | None,
    weight: Tensor,
    sel: ShardSelection,
    softmax: ChunkedSoftmax,
    pending: list[MicroBatch],
    scratch: Scratch,
    cache: Tensor | None = None,
) -> Tensor:
    """Mean loss over the global batch; its backward appends a :class:`MicroBatch` to ``pending``.

    ``embeddings`` are the gathered, normalised global batch, ``norms`` their feature norms
    (None when the margin reads none). Without grad mode nothing is recorded; embeddings
    that do not require grad still let the centers learn. ``cache`` ([batch, sel.count],
    fp32) keeps the probabilities for the update.
    """
    if not torch.is_grad_enabled():
        return softmax.forward(weight, embeddings, norms, sel, False, scratch).loss
    embedding_grad = embeddings.requires_grad
    if not embedding_grad:
        embeddings = embeddings.detach().requires_grad_()
    return _LeanLoss.apply(
        embeddings, norms, weight, sel, softmax, pending, embedding_grad, scratch, cache
    )
