"""The torch optimizer a config names ('sgd' or 'adamw'), for the backbone and autograd heads."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(
    kind: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over ``params``."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={kind!r}: choose one of {', '.join(OPTIMIZERS)}")
