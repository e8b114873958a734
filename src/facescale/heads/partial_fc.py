"""Partial FC: class centers sharded over ranks (model parallel), optionally sampled per step.

Two heads share the input checks, the all-gather, the sampling and the softmax statistics
(:class:`ShardedHead`):

* :class:`PartialFC`, the drop-in head: ``weight`` is an ``nn.Parameter``; the loss is plain
  autograd over the shard's (sampled) logits, so any torch optimizer steps the head.
* :class:`LeanPartialFC`: ``weight`` is a buffer the head updates itself (:meth:`step`),
  chunk by chunk; no dense gradient of the centers exists, and the [batch x classes]
  softmax is kept only while it fits ``cache_bytes`` (else recomputed in the update).
  Backward leaves each micro-batch in :attr:`LeanPartialFC.pending` (the head's ``.grad``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from facescale.distributed import get_rank, get_world_size

from .batch import GlobalBatch, gather_batch
from .collectives import sum_across_ranks
from .lean import ChunkedSoftmax, MicroBatch, lean_loss, raw_center_grad_, shard_rows
from .margins import Margin
from .native import native_sgd_store, sgd_kernel_on
from .options import check_head_args, resolve_logits_dtype
from .row_optim import RowOptimizer, RowSGD, fused_kwargs, make_row_optimizer
from .rows import Rows, Scratch
from .sampling import ClassSampler, ShardSelection, select_classes
from .shards import init_centers, shard_range
from .softmax import dense_shard_terms, inverse_norms, log_sum_exp
from .storage import RoundingNoise, RowTable, center_table, noise_terms, state_tables
from .subcenters import rows_selection, subcenter_rows

DEFAULT_CHUNK_SIZE = 4096  # classes: a chunk's buffers stay in a CPU's caches
DEFAULT_CACHE_BYTES = 512 * 2**20
ROUNDING_ROWS = 512  # CPU: rows narrow tables update and round at a time (1 MiB at 512-d: L2)
GPU_CHUNK_BUDGET = 2**30  # bytes of a chunk's buffers on a GPU (at most 1/32 of its memory)


def chunk_size_for(device: torch.device | str, rows: int, embedding_size: int) -> int:
    """Classes per chunk for a global batch of ``rows``: :data:`DEFAULT_CHUNK_SIZE` on CPU,
    :func:`gpu_chunk_size` on a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_CHUNK_SIZE
    total = torch.cuda.get_device_properties(device).total_memory
    return gpu_chunk_size(rows, embedding_size, total)


def gpu_chunk_size(rows: int, embedding_size: int, total_memory: int | None = None) -> int:
    """Classes per chunk on a GPU of ``total_memory`` bytes (None: 32 GiB or more, which all
    get the same size): as many as the chunk's buffers allow within
    :data:`GPU_CHUNK_BUDGET`, so a step of millions of classes launches hundreds of kernels,
    not tens of thousands."""
    budget = GPU_CHUNK_BUDGET if total_memory is None else min(GPU_CHUNK_BUDGET, total_memory // 32)
    # per class: fp32 logits and scaled probabilities (rows each); rows, grad, product (dim)
    per_class = 4 * (2 * rows + 3 * embedding_size)
    return max(DEFAULT_CHUNK_SIZE, budget // per_class // 1024 * 1024)


class ShardedHead(nn.Module):
    """What both Partial FC heads share: this rank's contiguous shard of the class centers,
    the per-step class sampling, and the chunked margin softmax's settings."""

    lean = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        sample_rate: float = 1.0,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        interclass_filtering_threshold: float = 0.0,
        logits_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        scale_embedding_grad: bool = True,
        num_subcenters: int = 1,
        center_dtype: str = "fp32",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        check_head_args(
            num_classes, embedding_size, margin, interclass_filtering_threshold, num_subcenters
        )
        if not 0 < sample_rate <= 1 or chunk_size <= 0:
            raise ValueError(
                f"sample_rate={sample_rate} must be in (0, 1] and chunk_size={chunk_size} > 0"
            )
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.sample_rate = sample_rate
        self.rank, self.world_size = get_rank(), get_world_size()
        # DDP averages the backbone's gradients over ranks: world_size x the embeddings'
        # gradient leaves the global-mean loss's gradient after that averaging
        self.embedding_grad_scale = float(self.world_size) if scale_embedding_grad else 1.0
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        # sub-center ArcFace: rows c * K ... c * K + K - 1 of the shard are class c's
        self.num_subcenters = num_subcenters
        self.num_rows = self.num_local * num_subcenters
        self.margin = margin
        self.softmax = ChunkedSoftmax(
            margin,
            interclass_filtering_threshold,
            resolve_logits_dtype(logits_dtype),
            chunk_size,
            num_subcenters,
        )
        self.sampler = (
            ClassSampler(self.num_local, sample_rate, seed, self.rank) if sample_rate < 1 else None
        )
        self._last_index: Tensor | None = None
        if center_dtype != "fp32" and not self.lean:
            raise ValueError(
                f"center_dtype={center_dtype!r} needs the lean head (lean=True), which updates "
                "its own centers; a torch optimizer steps the drop-in head's fp32 parameter"
            )
        self.seed = seed
        self.center_table = center_table(center_dtype)
        dtype = self.center_table.dtype
        start, count = self.class_start * num_subcenters, self.num_rows
        self._hold(init_centers(start, count, embedding_size, seed, device, dtype))

    def _hold(self, centers: Tensor) -> None:
        """Keep the shard's initial centers as ``self.weight`` (a parameter or a buffer)."""
        raise NotImplementedError

    def _gather_and_select(
        self, embeddings: Tensor, labels: Tensor, sizes: list[int] | None = None
    ) -> tuple[GlobalBatch, ShardSelection]:
        """The global batch (normalised embeddings, feature norms for the losses that read
        them) and this shard's selected classes; ``sizes``: every rank's rows, from a caller
        that checked the inputs (see gather_batch)."""
        batch = gather_batch(
            embeddings,
            labels,
            self.embedding_size,
            self.num_classes,
            grad_scale=self.embedding_grad_scale,
            norms=self.margin.uses_norms,
            norm_grad=self.margin.norm_grad,
            sizes=sizes,
        )
        sel = select_classes(batch.labels, self.class_start, self.num_local, self.sampler)
        self._last_index = sel.index
        return batch, sel

    def _regulariser(self, batch: GlobalBatch) -> Tensor | float:
        """The margin's per-sample regulariser, mean over the global batch (0 without one).

        Each rank adds up its own rows, so the norms' gradient is counted once."""
        if batch.norms is None:
            return 0.0
        own = self.margin.regulariser(batch.norms[batch.own_rows])
        return 0.0 if own is None else sum_across_ranks(own.sum()) / batch.size

    @property
    def sampled_classes(self) -> Tensor | None:
        """Global ids of this shard's classes computed by the last forward (None: all of them)."""
        return None if self._last_index is None else self._last_index + self.class_start

    def get_extra_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict() if self.sampler is not None else {}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.sampler is not None and state["sampler"]:
            self.sampler.load_state_dict(state["sampler"])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, shard=[{self.class_start}, "
            f"{self.class_start + self.num_local}), embedding_size={self.embedding_size}, "
            f"sample_rate={self.sample_rate}, chunk_size={self.softmax.chunk_size}, "
            f"logits_dtype={self.softmax.dtype}, "
            f"interclass_filtering_threshold={self.softmax.threshold}, "
            f"num_subcenters={self.num_subcenters}, "
            f"embedding_grad_scale={self.embedding_grad_scale}"
        )


class PartialFC(ShardedHead):
    """Margin-softmax classification layer whose class centers are split over the ranks.

    ``loss = head(local_embeddings, local_labels)`` takes global class ids and returns the
    mean loss over the global batch, the same value on every rank; the gradient reaches
    each rank's own embeddings, multiplied by the world size (as arcface_torch's head does)
    so that a backbone in ``DistributedDataParallel``, which averages its gradients over the
    ranks, receives the gradient of that global-mean loss. ``scale_embedding_grad=False``
    gives each rank the unscaled gradient of the loss to its embeddings. With
    ``sample_rate < 1`` a step computes, per shard, the positive classes of the global batch
    plus uniform negatives, ``ceil(sample_rate * num_local)`` classes in all. Runs with or
    without an initialised process group; any torch optimizer over ``head.parameters()``
    updates the centers.
    """

    def _hold(self, centers: Tensor) -> None:
        self.weight = nn.Parameter(centers)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean margin-softmax loss over the global batch (same value on every rank)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            batch, sel = self._gather_and_select(embeddings, labels)
            rows = None if sel.index is None else subcenter_rows(sel.index, self.num_subcenters)
            weight = self.weight if rows is None else self.weight[rows]
            valid, cols = sel.chunk_targets(0, sel.count)  # placeholders: any column, masked
            top, sumexp, target = dense_shard_terms(
                batch.embeddings,
                batch.norms,
                weight,
                sel.target_rows,
                cols,
                self.margin,
                self.softmax.threshold,
                self.softmax.dtype,
                across_ranks=True,
                subcenters=self.num_subcenters,
                valid=valid,
            )
            lse = log_sum_exp(top, sumexp, target, across_ranks=True)
            return (lse - target).sum() / batch.size + self._regulariser(batch)


class LeanPartialFC(ShardedHead):
    """:class:`PartialFC` that updates its own centers in chunks, with no dense gradient.

    After ``loss.backward()``, :meth:`step` applies the optimizer chosen by
    :meth:`configure_optimizer` to the rows the recorded micro-batches computed (several
    backwards accumulate, as ``.grad`` does); :meth:`zero_grad` forgets them. The softmax of a
    training forward is kept for the update while the step's caches fit ``cache_bytes``.
    """

    lean = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        sample_rate: float = 1.0,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        center_state_dtype: str = "fp32",
        **options: Any,
    ) -> None:
        """:class:`PartialFC`'s arguments (``options``: its keywords, with ``center_dtype``:
        'fp32', 'bf16' or 'fp16'), ``cache_bytes`` and ``center_state_dtype`` (the optimizer
        state's storage: 'fp32', 'bf16' or 'int8'); see :mod:`facescale.heads.storage`."""
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes={cache_bytes} must be >= 0")
        state_tables((), center_state_dtype)  # refuse an unknown kind before any allocation
        super().__init__(num_classes, embedding_size, margin, sample_rate, **options)
        self.center_state_dtype = center_state_dtype
        self.state_tables: tuple[RowTable, ...] = ()
        self.optimizer: RowOptimizer | None = None
        self._steps_done = torch.zeros(())  # optimizer steps taken, on the centers' device
        self._steps_known: int | None = 0  # the host's copy of it, while the host knows it
        self.pending: list[MicroBatch] = []  # what each backward since the last step left
        self._scratch = Scratch()  # chunk buffers, kept from step to step
        self.cache_bytes = cache_bytes
        self._cached: list[int] = []  # bytes of each probability cache handed out this step
        # the chunks' gradients grad_norm_sq formed, for step, with the micro-batches they cover
        self._kept: tuple[int, list[tuple[Rows, Tensor]]] | None = None

    def _hold(self, centers: Tensor) -> None:
        self.register_buffer("weight", centers)

    def forward(self, embeddings: Tensor, labels: Tensor, sizes: list[int] | None = None) -> Tensor:
        """Mean margin-softmax loss over the global batch (same value on every rank); given
        ``sizes`` (every rank's rows, inputs checked by the caller) nothing is checked here."""
        with torch.autocast(embeddings.device.type, enabled=False):
            batch, classes = self._gather_and_select(embeddings, labels, sizes)
            sel = rows_selection(classes, self.num_subcenters)
            loss = lean_loss(
                batch.embeddings,
                batch.norms,
                self.weight,
                sel,
                self.softmax,
                self.pending,
                self._scratch,
                self._probability_cache(batch.size, sel.count),
            )
            return loss + self._regulariser(batch)

    def _probability_cache(self, rows: int, columns: int) -> Tensor | None:
        """A reused fp32 [rows x columns] buffer for a training forward's softmax, while the
        caches handed out since the last step stay within ``cache_bytes``; else None."""
        size = rows * columns * 4
        if not torch.is_grad_enabled() or sum(self._cached) + size > self.cache_bytes:
            return None
        self._cached.append(size)
        name = f"probs{len(self._cached)}"
        return self._scratch.take(
            name, (rows, columns), self.weight.new_empty(0, dtype=torch.float32)
        )

    def configure_optimizer(
        self,
        kind: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        """Choose the centers' update ('sgd' or 'adamw') and create its per-row state."""
        for table in self.state_tables:
            table.unregister(self)
        self.optimizer = make_row_optimizer(kind, lr, momentum, weight_decay, betas, eps)
        self.state_tables = state_tables(self.optimizer.state_names, self.center_state_dtype)
        for table in self.state_tables:
            table.register(self, *self.weight.shape, self.weight.device)
        self._steps_done = torch.zeros((), device=self.weight.device)
        self._steps_known = 0

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken (skipped ones not counted); after a step whose skip flag
        stayed on the device, reading it waits for the device."""
        if self._steps_known is None:
            self._steps_known = int(self._steps_done)
        return self._steps_known

    @torch.no_grad()
    def center_grad_chunks(self) -> Iterator[tuple[Rows, Tensor]]:
        """This rank's center gradient accumulated since the last step, chunk by chunk.

        Yields ``(rows, grad)``: shard rows (a range, or sorted row ids under sampling) and
        the gradient of the recorded losses to those rows. Rows no micro-batch computed
        have no gradient and are not yielded.
        """
        for rows, _, grad in self._center_grads():
            yield rows, grad.clone()

    @property
    def _grads_kept(self) -> bool:
        """Whether :meth:`grad_norm_sq` kept the chunks' raw gradients of this step."""
        return self._kept is not None and self._kept[0] == len(self.pending)

    def _center_grads(self, raw: bool = True) -> Iterator[tuple[Rows, Tensor | None, Tensor]]:
        """``(rows, center rows, gradient)`` per chunk; the last two live in scratch buffers.
        Without ``raw`` (for the SGD kernel, which reads the rows and turns the gradient in
        its pass) the gradient is to the normalised rows unless :attr:`_grads_kept`, and the
        center rows are None where no micro-batch needs them.

        One recorded micro-batch (no gradient accumulation) needs nothing from the host;
        several under sampling read where each one's columns fall, once per step."""
        scratch, pending = self._scratch, self.pending
        if self._grads_kept:
            for rows, grad in self._kept[1]:
                block = self.softmax.centers(self.weight, rows, scratch)[0] if raw else None
                yield rows, block, grad
            return
        index = _union([mb.index for mb in pending]) if pending else None
        count = 0 if not pending else self.num_rows if index is None else index.numel()
        chunks = list(self.softmax.chunks(count))
        spans = _column_spans(pending, index, chunks)
        reads_centers = raw or any(mb.probs is None for mb in pending)
        block = inv_norm = None
        for k, (lo, hi) in enumerate(chunks):
            rows = shard_rows(index, lo, hi)
            if reads_centers:
                block, inv_norm = self.softmax.centers(self.weight, rows, scratch)
            shape = (hi - lo, self.embedding_size)
            grad = scratch.take("grad", shape, pending[0].embeddings, torch.float32)
            filled = False
            for mb, span in zip(pending, spans, strict=True):
                first, last = span[k]
                if first == last:
                    continue
                if last - first == hi - lo:
                    out = scratch.take("part", shape, grad) if filled else grad
                    self.softmax.add_center_grad(mb, block, inv_norm, first, out, scratch)
                    if filled:
                        grad.add_(out)
                else:
                    # mb's columns are a sorted subset of the chunk's sorted rows
                    hit = torch.searchsorted(rows, mb.index[first:last])
                    part = scratch.take("part", (last - first, shape[1]), grad)
                    centers = (None, None) if block is None else (block[hit], inv_norm[hit])
                    self.softmax.add_center_grad(mb, *centers, first, part, scratch)
                    (grad if filled else grad.zero_()).index_add_(0, hit, part)
                filled = True
            yield rows, block, raw_center_grad_(grad, block, inv_norm, scratch) if raw else grad

    @torch.no_grad()
    def grad_norm_sq(self) -> Tensor:
        """Squared L2 norm of this rank's accumulated center gradient (for global clipping).

        While they fit what ``cache_bytes`` leaves after the probability caches, the chunks'
        gradients are kept for :meth:`step`, which then does not form them again."""
        total = self.weight.new_zeros((), dtype=torch.float64)
        room = self.cache_bytes - sum(self._cached)
        kept: list[tuple[Rows, Tensor]] | None = []
        for rows, _, grad in self._center_grads():
            total += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
            room -= grad.numel() * grad.element_size()
            if room < 0:
                kept = None
            elif kept is not None:
                kept.append((rows, grad.clone()))
        self._kept = None if kept is None else (len(self.pending), kept)
        return total.float()

    @torch.no_grad()
    def step(
        self,
        lr: float | Tensor | None = None,
        grad_scale: float | Tensor = 1.0,
        skip: Tensor | None = None,
    ) -> None:
        """Update the centers with the recorded gradient times ``grad_scale``, then forget it.

        Only rows some recorded micro-batch computed change, with their optimizer state;
        ``lr`` defaults to the one given to :meth:`configure_optimizer`. Where ``skip`` (a
        0-d float tensor) is nonzero nothing changes; fused kernels read it on the device.
        """
        optimizer = self._require_optimizer()
        if not self.pending:
            self._forget()
            return
        lr = optimizer.lr if lr is None else lr
        narrow = any(t.narrow for t in self._tables)
        step_number = None  # the host's count of this step, for the narrow tables' rounding
        if skip is not None and (narrow or not fused_kwargs(self.weight.device.type)):
            # no fused kernel to skip on the device, or narrow tables (a skipped step must not
            # round them again): read the flag here
            skipped, done = torch.stack([skip.float().cpu(), self._steps_done.cpu()]).tolist()
            self._steps_known = int(done)
            if skipped:
                self._forget()
                return
            skip, step_number = None, int(done) + 1
        elif narrow:
            step_number = self.optimizer_steps + 1
        self._steps_done = self._steps_done.to(self.weight.device)
        # narrow tables under SGD on a CPU: the kernel reads the rows, and forms their raw
        # gradient in its pass unless grad_norm_sq kept it
        fused = step_number is not None and isinstance(optimizer, RowSGD)
        fused = fused and sgd_kernel_on(self.weight.device)
        radial = fused and not self._grads_kept
        for rows, block, grad in self._center_grads(raw=not fused):
            if isinstance(grad_scale, Tensor) or grad_scale != 1.0:
                grad.mul_(grad_scale)
            self._update(rows, block, grad, optimizer, lr, skip, step_number, radial)
        self._steps_done += 1.0 if skip is None else 1.0 - skip
        if skip is not None:  # taken or not: the device knows
            self._steps_known = None
        elif self._steps_known is not None:
            self._steps_known += 1
        self._forget()

    def _update(
        self,
        rows: Rows,
        block: Tensor | None,
        grad: Tensor,
        optimizer: RowOptimizer,
        lr: float | Tensor,
        skip: Tensor | None,
        step_number: int | None,
        radial: bool = False,
    ) -> None:
        """Apply the optimizer to a chunk's rows and store them; ``step_number`` (the host's
        count of this step) only when a table is narrow; ``block`` None: the rows are read
        from their table; ``radial``: ``grad`` is to the normalised rows. With narrow tables
        on a CPU the update, the rounding noise and the rounding go :data:`ROUNDING_ROWS` rows
        at a time, so that their passes over a block stay in the core's cache (a GPU takes the
        chunk at once: fewer kernel launches)."""
        if step_number is None:
            self._update_by_torch(rows, block, grad, optimizer, lr, skip)
            return
        row_terms, column_terms = self._noise_terms(rows, grad, step_number)
        combined = self._scratch.take("noise", tuple(grad.shape), row_terms)
        work = Scratch()  # the rounding's temporaries, reused by the chunk's row blocks
        span = ROUNDING_ROWS if grad.device.type == "cpu" else len(grad)
        # SGD: the one-pass kernel's fixed arguments (the tables, momentum and weight decay)
        kernel = self._kernel_arguments(optimizer) if isinstance(optimizer, RowSGD) else None
        for lo in range(0, len(grad), span):
            hi = min(lo + span, len(grad))
            noise = RoundingNoise(row_terms[lo:hi], column_terms, combined[lo:hi])
            sub, part_grad = _sub_rows(rows, lo, hi), grad[lo:hi]
            part = None if block is None else block[lo:hi]
            terms = (noise.rows, noise.columns)
            if kernel and native_sgd_store(part, part_grad, sub, terms, *kernel, lr, radial):
                continue
            if part is None:
                part = self.center_table.read(self, sub, self._scratch)
            if radial:
                part_grad = raw_center_grad_(part_grad, part, inverse_norms(part), work)
            self._update_by_torch(sub, part, part_grad, optimizer, lr, None, noise, work)

    @property
    def _tables(self) -> tuple[RowTable, ...]:
        """The centers' table and the optimizer state's."""
        return (self.center_table, *self.state_tables)

    def _kernel_arguments(self, optimizer: RowSGD) -> tuple[Any, ...]:
        """The centers' and the momentum's tables, and the momentum and weight decay, as
        :func:`native_sgd_store` takes them."""
        (momentum,) = self.state_tables or (None,)
        stored = None
        if momentum is not None:
            scales = getattr(self, momentum.scale_name, None)
            stored = (momentum.kind, getattr(self, momentum.name), scales)
        factors = (optimizer.momentum, optimizer.weight_decay)
        return (self.center_table.kind, self.weight), stored, factors

    def _update_by_torch(
        self,
        rows: Rows,
        block: Tensor,
        grad: Tensor,
        optimizer: RowOptimizer,
        lr: float | Tensor,
        skip: Tensor | None,
        noise: RoundingNoise | None = None,
        work: Scratch | None = None,
    ) -> None:
        """Update rows and their state with torch and store them; narrow tables round with
        ``noise`` and take SGD by operation, the arithmetic of the one-pass kernel."""
        state = {t.name: t.read(self, rows, self._scratch) for t in self.state_tables}
        if noise is not None and isinstance(optimizer, RowSGD):
            optimizer.update_by_operation(block, state.get("momentum_buffer"), grad, lr)
        else:
            optimizer.update(block, state, grad, lr, self._steps_done, skip)
        for table, values in zip(self._tables, (block, *state.values()), strict=True):
            table.write(self, rows, values, noise if table.narrow else None, work)

    def _noise_terms(self, rows: Rows, like: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """The terms of the noise narrow tables round ``rows`` with at optimizer step ``step``
        (:func:`noise_terms`): fixed by the seed, the step and the rows' global ids (class x
        sub-centers)."""
        if isinstance(rows, slice):
            local = torch.arange(rows.start, rows.stop, device=like.device)
        else:
            local = rows
        ids = local + self.class_start * self.num_subcenters
        return noise_terms(self.seed, step, ids, like.shape[1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the micro-batches recorded since the last step."""
        self._forget()

    def _forget(self) -> None:
        self.pending.clear()
        self._cached.clear()
        self._kept = None

    def _require_optimizer(self) -> RowOptimizer:
        if self.optimizer is None:
            raise RuntimeError("call head.configure_optimizer(...) before head.step()")
        return self.optimizer

    def checkpoint_state(self) -> dict[str, Any]:
        """Centers, optimizer state and counters of this shard (classes first: re-shardable;
        a class's sub-centers as one ``[K, ...]`` entry)."""
        state = self.state_dict()
        k = self.num_subcenters
        for name, value in state.items():
            if k > 1 and torch.is_tensor(value) and value.dim() and len(value) == self.num_rows:
                state[name] = value.view(self.num_local, k, *value.shape[1:])
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`checkpoint_state`; tables saved in another storage kind are converted
        (:meth:`RowTable.convert`: widening is exact, narrowing rounds to nearest)."""
        k = self.num_subcenters
        rows = {
            name: value.flatten(0, 1)
            for name, value in state.items()
            if k > 1 and torch.is_tensor(value) and value.shape[:2] == (self.num_local, k)
        }
        state = {**state, **rows}
        for table in self._tables:
            state = table.convert(state)
        self.load_state_dict(state)

    def get_extra_state(self) -> dict[str, Any]:
        return super().get_extra_state() | {"optimizer_steps": self.optimizer_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._steps_known = int(state["optimizer_steps"])
        self._steps_done = torch.tensor(float(self._steps_known), device=self.weight.device)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, cache_bytes={self.cache_bytes}, "
            f"center_dtype={self.center_table.kind}, center_state_dtype={self.center_state_dtype}"
        )


def _sub_rows(rows: Rows, lo: int, hi: int) -> Rows:
    """Rows ``lo`` to ``hi`` of ``rows`` (a range, or row ids)."""
    if isinstance(rows, slice):
        return slice(rows.start + lo, rows.start + hi)
    return rows[lo:hi]


def _union(indices: list[Tensor | None]) -> Tensor | None:
    """Sorted union of the micro-batches' sampled rows (None: every row)."""
    if indices[0] is None:
        return None
    return indices[0] if len(indices) == 1 else torch.unique(torch.cat(indices))


def _column_spans(
    pending: list[MicroBatch], index: Tensor | None, chunks: list[tuple[int, int]]
) -> list[list[tuple[int, int]]]:
    """Per micro-batch, per chunk of ``index`` (the union of their samples): the micro-batch's
    columns ``[first, last)`` there, all found with one transfer to the host."""
    if index is None or len(pending) == 1 or not chunks:  # the union is each one's columns
        return [list(chunks) for _ in pending]
    starts = torch.tensor([lo for lo, _ in chunks], device=index.device)
    lasts = torch.tensor([hi - 1 for _, hi in chunks], device=index.device)
    ends = torch.stack([index[starts], index[lasts] + 1], dim=1).flatten()
    found = torch.stack([torch.searchsorted(mb.index, ends) for mb in pending]).tolist()
    return [list(zip(row[0::2], row[1::2], strict=True)) for row in found]
