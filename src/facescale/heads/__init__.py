"""The classification layer: margins, sharded margin softmax (model parallel, Partial FC) and
the data-parallel baseline. See docs/heads.md."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adaface import AdaFace
from .curricularface import CurricularFace
from .data_parallel import DataParallelFC
from .interface import TrainableHead
from .magface import MagFace
from .margins import ArcFace, CombinedMargin, CosFace, Margin, monotone_cos
from .partial_fc import LeanPartialFC, PartialFC
from .shards import shard_range

HEAD_KINDS = ("partial_fc", "data_parallel")


def build_head(
    kind: str,
    num_classes: int,
    embedding_size: int,
    margin: Margin,
    sample_rate: float = 1.0,
    **options: Any,
) -> nn.Module:
    """The head named ``kind``: 'partial_fc' (model parallel, sampled when sample_rate < 1)
    or 'data_parallel' (the replicated baseline: sample_rate 1, drop-in only).

    ``options`` are the heads' keywords: ``lean`` (:class:`LeanPartialFC` instead of the
    drop-in :class:`PartialFC`), ``chunk_size``, ``cache_bytes``, ``center_dtype`` and
    ``center_state_dtype`` (lean only: narrow storage, :mod:`facescale.heads.storage`),
    ``device`` (where the centers are made), ``interclass_filtering_threshold``,
    ``logits_dtype``, ``seed``, ``scale_embedding_grad``, ``num_subcenters``; the
    data-parallel head takes the last five.
    """
    if kind == "partial_fc":
        if options.pop("lean", False):
            return LeanPartialFC(num_classes, embedding_size, margin, sample_rate, **options)
        options.pop("cache_bytes", None)  # the drop-in head keeps nothing between steps
        _refuse_narrow(kind, options, "center_state_dtype")
        return PartialFC(num_classes, embedding_size, margin, sample_rate, **options)
    if kind == "data_parallel":
        lean = options.pop("lean", False)
        options.pop("chunk_size", None)
        options.pop("cache_bytes", None)
        options.pop("device", None)
        _refuse_narrow(kind, options, "center_dtype", "center_state_dtype")
        if sample_rate != 1.0 or lean:
            raise ValueError(
                f"head 'data_parallel' computes every class with a torch optimizer: it takes "
                f"sample_rate=1 and lean=False (got sample_rate={sample_rate}, lean={lean}); "
                "use 'partial_fc' for sampling or the lean mode"
            )
        return DataParallelFC(num_classes, embedding_size, margin, **options)
    raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_KINDS)}")


def _refuse_narrow(kind: str, options: dict[str, Any], *names: str) -> None:
    """Take storage options a head without its own update cannot honour: fp32 only."""
    for name in names:
        value = options.pop(name, "fp32")
        if value != "fp32":
            raise ValueError(
                f"{name}={value!r}: head {kind!r} is stepped by a torch optimizer and keeps "
                "fp32; narrow storage needs the lean Partial FC head (lean=True)"
            )


__all__ = [
    "HEAD_KINDS",
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DataParallelFC",
    "LeanPartialFC",
    "MagFace",
    "Margin",
    "PartialFC",
    "TrainableHead",
    "build_head",
    "monotone_cos",
    "shard_range",
]
