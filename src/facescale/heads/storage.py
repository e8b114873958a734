"""Per-row tables of the lean head (class centers, optimizer state) in fp32, 16 or 8 bits.

Every chunk's math stays fp32: a block of rows is widened when read and rounded when written
back. Writes round stochastically, so an update far below one unit in the last place still
moves a row by the right amount on average. The rounding noise of an entry is a function of
(seed, table, optimizer step, global class, column) alone: a resumed run rounds as the
interrupted one would have, on any number of ranks.

Storage kinds:

* ``fp32``: stored as computed (views, no copies: the arithmetic of a full-width head).
* ``bf16``: fp32's range with 8 significant bits; the rounding adds 16 random bits below the
  kept ones and truncates.
* ``fp16``: 11 significant bits, largest value 65504. Centers start as N(0, 0.01) and only
  their direction enters the logits, so they stay far inside the range; values beyond it
  saturate at +-65504 rather than become infinite (a run that gets there has diverged, and
  its loss shows it). Values below 2**-14 keep an absolute resolution of 2**-24.
* ``int8`` (optimizer state only): one byte per entry and an fp32 scale per row, as 8-bit
  optimizers do. Signed state (momentum, Adam's first moment) is stored as
  ``round(x / scale)`` in [-127, 127] with ``scale = max|x| / 127``. Adam's second moment
  ``v`` is non-negative and spans the square of the gradients' range, so it is stored as
  ``sqrt(v)`` in [0, 255] (uint8) with ``scale = max sqrt(v) / 255``: the update divides by
  ``sqrt(v)``, which this keeps to a uniform absolute step, and a row's small entries keep
  the resolution that a linear map of ``v`` would spend on the square of its largest.
  Stochastic rounding keeps ``sqrt(v)`` unbiased, so ``v`` reads at most one step's variance
  high: slightly smaller updates, never larger ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from facescale.seeding import stream_seed

from .native import native_store
from .rows import Rows, Scratch, scatter_rows, write_rows

CENTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = ("fp32", "bf16", "int8")
NOISE_BITS = 16  # random bits per rounded entry
_MASK32 = 0xFFFFFFFF
_ROUNDING = 0x5EED  # keeps the rounding streams apart from other users of the seed


def row_bytes(kind: str, dim: int) -> int:
    """Bytes one row of ``dim`` entries takes in storage ``kind``."""
    if kind == "int8":
        return dim + 4  # the entries and the row's fp32 scale
    return dim * (4 if kind == "fp32" else 2)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash, elementwise on int64 values in [0, 2**32)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def rounding_noise(
    seed: int, step: int, classes: Tensor, dim: int, out: Tensor | None = None
) -> Tensor:
    """``[len(classes), dim]`` int32 values, uniform in [0, 2**NOISE_BITS), fixed by (seed,
    step, class, column).

    A row draws one value from its class and the step, each column one from the step; an
    entry is their sum modulo 2**NOISE_BITS. So every entry is uniform and fresh at every
    step, for the cost of one addition per entry. The tables of a row block share it: each
    table's rounding is unbiased on its own.
    """
    return combine_noise(*noise_terms(seed, step, classes, dim), out)


def noise_terms(seed: int, step: int, classes: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The row values (``[len(classes)]``) and column values (``[dim]``), int32, that
    :func:`combine_noise` makes :func:`rounding_noise` of; a block of rows takes its slice."""
    salt = stream_seed(seed, _ROUNDING, step)
    classes = classes.to(torch.int64)
    key = _mix32((classes >> 32) ^ (salt & _MASK32))
    rows = _mix32(key ^ (classes & _MASK32)).to(torch.int32)
    columns = torch.arange(dim, device=classes.device, dtype=torch.int64)
    columns = _mix32(columns ^ (salt >> 31 & _MASK32)).to(torch.int32)
    return rows, columns


def combine_noise(rows: Tensor, columns: Tensor, out: Tensor | None = None) -> Tensor:
    """The rounding noise of :func:`noise_terms`' values: their sum modulo 2**NOISE_BITS."""
    if out is None:
        out = torch.empty(len(rows), len(columns), dtype=torch.int32, device=rows.device)
    torch.add(rows[:, None], columns[None, :], out=out)
    return out.bitwise_and_((1 << NOISE_BITS) - 1)


@dataclass
class RoundingNoise:
    """The rounding noise of a block of rows as :func:`noise_terms` gives it; combined into
    ``out`` (:func:`combine_noise`) when first needed whole, once for all the block's tables."""

    rows: Tensor
    columns: Tensor
    out: Tensor | None = None
    _whole: Tensor | None = field(default=None, init=False, repr=False)

    def whole(self) -> Tensor:
        if self._whole is None:
            self._whole = combine_noise(self.rows, self.columns, self.out)
        return self._whole


def round_bf16_(block: Tensor, noise: Tensor) -> Tensor:
    """``block`` (fp32, overwritten) rounded stochastically to bfloat16's grid, still fp32.

    Adding the noise to the 16 bits bfloat16 drops and truncating them rounds the magnitude
    up with probability equal to the dropped fraction (the carry reaches the exponent when a
    binade ends).
    """
    bits = block.view(torch.int32)
    bits.add_(noise).bitwise_and_(-(1 << NOISE_BITS))
    return block


def round_fp16_(block: Tensor, noise: Tensor, work: Scratch | None = None) -> Tensor:
    """``block`` (fp32, overwritten) rounded stochastically to float16's grid, saturating at
    float16's largest value; still fp32. Its temporaries come from ``work`` when given.

    As for bfloat16, on the 13 bits float16 drops from a normal value. A subnormal value
    (below 2**-14) is first moved up by 2**-14 into the lowest normal binade, whose spacing
    (2**-24) is the subnormals' own, rounded there, and moved back: the move up rounds in
    fp32 only far below that spacing (2**-37), the move back is exact.
    """
    info, work = torch.finfo(torch.float16), work or Scratch()
    magnitude = torch.abs(block, out=work.take("round_f32", tuple(block.shape), block))
    # 1.0 where the value is below float16's normal range, else 0.0
    below = work.take("round_f32_flag", tuple(block.shape), block)
    subnormal = torch.lt(magnitude, info.tiny, out=below)
    bits = magnitude.add_(subnormal, alpha=info.tiny).view(torch.int32)
    shifted = work.take("round_i32", tuple(noise.shape), noise)
    bits.add_(torch.bitwise_right_shift(noise, NOISE_BITS - 13, out=shifted))
    bits.bitwise_and_(-(1 << 13))
    magnitude.sub_(subnormal, alpha=info.tiny).clamp_(max=info.max)
    return torch.copysign(magnitude, block, out=block)


@dataclass(frozen=True)
class RowTable:
    """One per-row table of the head, stored as ``kind``: the buffer ``name`` (``[rows, dim]``)
    and, for int8, the fp32 per-row scales ``name + '_scale'``. ``nonnegative`` tables
    (Adam's second moment) keep their square root in int8."""

    name: str
    kind: str
    nonnegative: bool = False

    @property
    def scale_name(self) -> str:
        return f"{self.name}_scale"

    @property
    def narrow(self) -> bool:
        return self.kind != "fp32"

    def encode(self, values: Tensor) -> dict[str, Tensor]:
        """Stored tensors of fp32 ``values``, rounded to nearest (initial values, conversions)."""
        if self.kind == "fp16":
            values = values.clamp(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
        if self.kind in CENTER_DTYPES:
            return {self.name: values.to(CENTER_DTYPES[self.kind])}
        levels, scale = self._quantize(values.float().clone(), None)
        return {self.name: levels.to(self.dtype), self.scale_name: scale}

    def decode(self, stored: Mapping[str, Tensor]) -> Tensor:
        """fp32 values of this table from stored tensors of any kind (a checkpoint's too)."""
        values = stored[self.name]
        if values.is_floating_point():
            return values.float()
        widened = values.float().mul_(stored[self.scale_name][:, None])
        return widened.square_() if self.nonnegative else widened

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored entries."""
        if self.kind == "int8":
            return torch.uint8 if self.nonnegative else torch.int8
        return CENTER_DTYPES[self.kind]

    def holds(self, stored: Mapping[str, Tensor]) -> bool:
        """Whether ``stored`` is already in this table's kind (it loads bit for bit)."""
        scaled = self.scale_name in stored
        return stored[self.name].dtype == self.dtype and scaled == (self.kind == "int8")

    def register(self, module: nn.Module, count: int, dim: int, device: torch.device) -> None:
        """Register this table's buffers on ``module``, all zeros, built in their stored form."""
        module.register_buffer(self.name, torch.zeros(count, dim, dtype=self.dtype, device=device))
        if self.kind == "int8":
            module.register_buffer(self.scale_name, torch.zeros(count, device=device))

    def unregister(self, module: nn.Module) -> None:
        for name in (self.name, self.scale_name):
            if hasattr(module, name):
                delattr(module, name)

    def convert(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with this table's entries in this table's kind: as they are when already
        so, else decoded to fp32 and rounded to nearest (an fp32 or 16-bit table loaded into
        16 or 8 bits rounds; widening is exact)."""
        state = dict(state)
        if self.name in state and not self.holds(state):
            values = self.decode(state)
            state.pop(self.scale_name, None)
            state.update(self.encode(values))
        return state

    def read(self, module: nn.Module, rows: Rows, scratch: Scratch) -> Tensor:
        """fp32 rows of the table: a view for fp32 and a range, else a widened copy."""
        table = getattr(module, self.name)
        if self.kind != "int8":
            return scratch.wide_rows(self.name, table, rows)
        codes = scratch.rows_of(f"{self.name}_codes", table, rows)
        scale = getattr(module, self.scale_name)[rows]
        wide = scratch.take(self.name, tuple(codes.shape), scale).copy_(codes)
        wide.mul_(scale[:, None])  # widened first: a mixed-dtype multiply is not vectorised
        return wide.square_() if self.nonnegative else wide

    def write(
        self,
        module: nn.Module,
        rows: Rows,
        block: Tensor,
        noise: RoundingNoise | None,
        work: Scratch | None = None,
    ) -> None:
        """Store the updated fp32 ``block`` of ``rows`` (from :meth:`read`), rounding with
        ``noise`` (unused for fp32). A narrow block is overwritten; on CPU the one-pass kernel
        stores it (:mod:`facescale.heads.native`), elsewhere torch, the rounding's temporaries
        coming from ``work`` when given (reused blocks, not fresh page-faulting allocations)."""
        table = getattr(module, self.name)
        if not self.narrow:
            write_rows(table, rows, block)
            return
        scales = getattr(module, self.scale_name) if self.kind == "int8" else None
        terms = (noise.rows, noise.columns)
        if native_store(self.kind, block, *terms, table, rows, scales, self.nonnegative):
            return
        work = work or Scratch()
        if self.kind == "int8":
            levels, scale = self._quantize(block, noise.whole(), work)
            _store(scales, rows, scale, work)
            _store(table, rows, levels, work)
            return
        if self.kind == "bf16":
            rounded = round_bf16_(block, noise.whole())
        else:
            rounded = round_fp16_(block, noise.whole(), work)
        _store(table, rows, rounded, work)

    def _quantize(
        self, block: Tensor, noise: Tensor | None, work: Scratch | None = None
    ) -> tuple[Tensor, Tensor]:
        """The 8-bit codes (as fp32 integers, in ``block``, overwritten) and per-row scales of
        ``block``; stochastic with noise."""
        if self.nonnegative:
            block.clamp_(min=0).sqrt_()
        levels = 255 if self.nonnegative else 127
        largest = block.amax(dim=1)  # of the magnitudes: max(max, -min), +0.0 for zeros
        if not self.nonnegative:
            largest = torch.maximum(largest, block.amin(dim=1).neg_())
        scale = largest.abs_().div_(levels)
        block.div_(torch.where(scale > 0, scale, 1.0)[:, None])
        if noise is None:
            block.round_()
        else:  # floor(x / scale + u), u uniform in [0, 1)
            unit = (work or Scratch()).take("round_f32", tuple(block.shape), block)
            block.add_(unit.copy_(noise).mul_(2.0**-NOISE_BITS)).floor_()
        lowest = 0 if self.nonnegative else -levels
        return block.clamp_(lowest, levels), scale


def _store(table: Tensor, rows: Rows, values: Tensor, work: Scratch) -> None:
    """``table[rows] = values``, converting to the table's dtype (exact for rounded values):
    a range as it copies, row ids through a block of ``work``."""
    if isinstance(rows, slice):
        table[rows].copy_(values)
    else:
        stored = work.take(f"stored_{table.dtype}", tuple(values.shape), table)
        scatter_rows(table, rows, stored.copy_(values))


def center_table(kind: str) -> RowTable:
    """The centers' table (``weight``) stored as ``kind`` (fp32, bf16 or fp16)."""
    if kind not in CENTER_DTYPES:
        raise ValueError(f"center_dtype={kind!r}: use one of {', '.join(CENTER_DTYPES)}")
    return RowTable("weight", kind)


def state_tables(names: tuple[str, ...], kind: str) -> tuple[RowTable, ...]:
    """The optimizer state's tables, stored as ``kind`` (fp32, bf16 or int8)."""
    if kind not in STATE_DTYPES:
        raise ValueError(f"center_state_dtype={kind!r}: use one of {', '.join(STATE_DTYPES)}")
    return tuple(RowTable(name, kind, nonnegative=name == "exp_avg_sq") for name in names)
