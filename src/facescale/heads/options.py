"""Checks of the arguments every head takes, with errors that say what is allowed."""

from __future__ import annotations

import torch

from .margins import Margin

LOGITS_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_logits_dtype(value: torch.dtype | str | None) -> torch.dtype:
    """The dtype to compute logits in: None means fp32; names like 'fp16' or 'bf16' work too."""
    if value is None:
        return torch.float32
    if isinstance(value, str) and value.lower() in LOGITS_DTYPES:
        return LOGITS_DTYPES[value.lower()]
    if value in LOGITS_DTYPES.values():
        return value
    raise ValueError(f"logits_dtype={value!r}: use None, 'fp32', 'fp16' or 'bf16'")


def check_head_args(
    num_classes: int, embedding_size: int, margin: Margin, threshold: float, subcenters: int = 1
) -> None:
    """Raise ValueError naming the first argument out of range."""
    if num_classes <= 0 or embedding_size <= 0:
        raise ValueError(
            f"num_classes={num_classes} and embedding_size={embedding_size} must be > 0"
        )
    if not isinstance(margin, Margin):
        raise TypeError(
            f"margin must be a Margin (ArcFace, CosFace, AdaFace, ...), not {type(margin).__name__}"
        )
    if subcenters < 1:
        raise ValueError(f"num_subcenters={subcenters} must be >= 1 (1: one center per class)")
    if not 0 <= threshold < 1:
        raise ValueError(
            f"interclass_filtering_threshold={threshold} must be in [0, 1); 0 turns it off"
        )
