"""Blocks of center rows: a range (a view) or sorted row ids (a copy in a reused buffer)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

Rows = slice | Tensor  # a contiguous range of rows, or sorted row ids


@dataclass
class Scratch:
    """Buffers reused by every chunk and every step, instead of fresh (page-faulting)
    allocations; they hold ``O(chunk x dim)`` memory."""

    buffers: dict[str, Tensor] = field(default_factory=dict)

    def take(
        self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor:
        """An uninitialised ``shape`` tensor of ``like``'s device and dtype (or ``dtype``),
        named ``name``."""
        numel = math.prod(shape)
        dtype = dtype or like.dtype
        buffer = self.buffers.get(name)
        kind = (dtype, like.device)
        if buffer is None or buffer.numel() < numel or (buffer.dtype, buffer.device) != kind:
            buffer = self.buffers[name] = like.new_empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)

    def rows_of(self, name: str, table: Tensor, rows: Rows) -> Tensor:
        """``table[rows]``: a view for a range, else a copy in buffer ``name``."""
        if isinstance(rows, slice):
            return table[rows]
        out = self.take(name, (len(rows), *table.shape[1:]), table)
        return torch.index_select(table, 0, rows, out=out)

    def wide_rows(self, name: str, table: Tensor, rows: Rows) -> Tensor:
        """``table[rows]`` in fp32: :meth:`rows_of` for an fp32 table, else a widened copy in
        buffer ``name`` (the narrow rows pass through buffer ``name + '_stored'``)."""
        if table.dtype == torch.float32:
            return self.rows_of(name, table, rows)
        stored = self.rows_of(f"{name}_stored", table, rows)
        wide = self.take(name, tuple(stored.shape), stored.new_empty(0, dtype=torch.float32))
        return wide.copy_(stored)


def write_rows(table: Tensor, rows: Rows, block: Tensor) -> None:
    """Store a block from :meth:`Scratch.rows_of` updated in place (a range is a view already)."""
    if not isinstance(rows, slice):
        scatter_rows(table, rows, block)


def scatter_rows(table: Tensor, rows: Tensor, values: Tensor) -> None:
    """``table[rows] = values`` for a ``[count, width]`` table and values of its dtype. Rows
    move as 8-byte words where their bytes allow: ``index_copy_`` costs per element, so a row
    of 512 int8 entries is 64 copies, not 512."""
    if table.dim() == 2 and table.shape[1] * table.element_size() % 8 == 0:
        table, values = table.view(torch.int64), values.contiguous().view(torch.int64)
    table.index_copy_(0, rows, values)
