"""Random seeds: one call that seeds every generator, and seeds derived from integer keys.

A derived seed is a pure function of its keys (seed, rank, step, block, ...), so each rank,
step or block draws its own stream and a resumed run draws exactly what it would have drawn.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

RANK_STRIDE = 1000003  # a prime: ranks' streams stay apart for the first million steps
_GOLDEN = 0x9E3779B97F4A7C15  # odd constant that spreads the keys over 63-bit seeds


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """``deterministic``: torch's deterministic algorithms and cuDNN's deterministic kernels,
    without autotuning (a repeated run is bit-identical on a GPU too, more slowly; an op
    without a deterministic version raises, naming itself). Otherwise cuDNN autotunes its
    convolutions, which pays off for the fixed face size."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of ``rank`` at optimizer step ``step``: ``seed + 1000003 * rank + step``."""
    return seed + RANK_STRIDE * rank + step


def stream_seed(*parts: int) -> int:
    """A 63-bit generator seed mixed from integers (seed, rank, counter, ...)."""
    value = 0
    for part in parts:
        value = (value * _GOLDEN + part + 1) % (1 << 63)
    return value


def rng_for(*keys: int) -> np.random.Generator:
    """A numpy generator determined by integer keys (seed, tag, epoch, rank, ...)."""
    return np.random.default_rng([int(k) for k in keys])
