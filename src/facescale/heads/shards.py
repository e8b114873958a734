"""Which classes a rank holds, and their initial centers (independent of the world size)."""

from __future__ import annotations

import torch
from torch import Tensor

from facescale.seeding import stream_seed

INIT_STD = 0.01  # arcface_torch's normal(0, 0.01) initialisation of the class centers
INIT_BLOCK = 8192  # classes drawn from one random stream; fixed so shards can be re-cut


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, count)`` of the contiguous classes ``rank`` holds, split as in arcface_torch."""
    if num_classes <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard_range(num_classes={num_classes}, rank={rank}, world_size={world_size}): "
            "need num_classes > 0, world_size > 0 and 0 <= rank < world_size"
        )
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def init_centers(
    start: int,
    count: int,
    embedding_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial centers of classes ``[start, start + count)``: N(0, 0.01), one stream per block.

    Each block of :data:`INIT_BLOCK` classes has its own seeded stream, so a class's initial
    center does not depend on how the classes are split over ranks. The blocks are drawn on
    ``device`` and stored as ``dtype`` (rounded to nearest) one by one: the only full-size
    tensor is the result. (Generators of different device types give different values.)
    """
    out = torch.empty(count, embedding_size, device=device, dtype=dtype)
    generator = torch.Generator(device=device)
    first, last = start // INIT_BLOCK, (start + count - 1) // INIT_BLOCK
    for block in range(first, last + 1) if count else ():
        generator.manual_seed(stream_seed(seed, block))
        lo, hi = max(start, block * INIT_BLOCK), min(start + count, (block + 1) * INIT_BLOCK)
        values = torch.empty(INIT_BLOCK, embedding_size, device=device)
        values.normal_(0.0, INIT_STD, generator=generator)
        out[lo - start : hi - start] = values[lo - block * INIT_BLOCK : hi - block * INIT_BLOCK]
    return out
