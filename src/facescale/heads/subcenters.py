"""Sub-center ArcFace (Deng et al., ECCV 2020): K center rows per class, a class's cosine
being its best sub-center's. Rows of class ``c`` are ``c * K ... c * K + K - 1`` of the shard;
these functions move between class columns and sub-center rows."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .sampling import ShardSelection


def subcenter_rows(classes: Tensor, k: int) -> Tensor:
    """Sorted shard rows of the sorted local ``classes``: each class's ``k`` sub-centers."""
    return (classes[:, None] * k + torch.arange(k, device=classes.device)).flatten()


def rows_selection(sel: ShardSelection, k: int) -> ShardSelection:
    """``sel`` over sub-center rows: every computed class brings its ``k`` rows, and each
    target points at its class's first row until :func:`pick_subcenters` chooses."""
    if k == 1:
        return sel
    index = None if sel.index is None else subcenter_rows(sel.index, k)
    return ShardSelection(
        index, sel.count * k, sel.target_rows, sel.target_cols * k, sel.target_local * k
    )


def pick_subcenters(sel: ShardSelection, best: Tensor) -> ShardSelection:
    """``sel`` (from :func:`rows_selection`) whose targets point at sub-center ``best`` of
    their class, sorted by column again."""
    cols = sel.target_cols + best
    order = torch.argsort(cols, stable=True)
    return dataclasses.replace(
        sel,
        target_rows=sel.target_rows[order],
        target_cols=cols[order],
        target_local=(sel.target_local + best)[order],
    )


def best_of(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per class (``k`` consecutive columns of ``logits``) the largest logit and its
    sub-center."""
    values, best = logits.view(logits.shape[0], logits.shape[1] // k, k).max(dim=2)
    return values, best


def spread(values: Tensor, best: Tensor, k: int, out: Tensor) -> Tensor:
    """Class columns ``values`` placed on their best sub-center's column of ``out`` (rows x
    classes * k), zeros elsewhere."""
    grouped = out.zero_().view(out.shape[0], out.shape[1] // k, k)
    grouped.scatter_(2, best[:, :, None], values[:, :, None])
    return out
