"""The torch optimizer a config names ('sgd' or 'adamw'), for the backbone and autograd heads,
and its step skipped on the device when a flag says the gradient is not finite."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

OPTIMIZERS = ("sgd", "adamw")
FUSED_DEVICES = ("cpu", "cuda")  # where torch has fused SGD and AdamW kernels


def build_optimizer(
    kind: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over ``params``; fused where the parameters' device has the
    kernels, so :func:`step_unless` skips a step without reading the flag on the host."""
    params = list(params)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused
        )
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"optimizer={kind!r}: choose one of {', '.join(OPTIMIZERS)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float | Tensor) -> None:
    """Every parameter group's LR; a 0-d device tensor only for a fused optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a 0-d float tensor, nonzero: skip) is set.

    A fused optimizer reads the flag in its kernel (torch's ``found_inf``, as GradScaler
    passes it): no host synchronisation, and a skipped step leaves parameters and state
    bit-identical. Any other optimizer reads the flag on the host.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        if not bool(skip):
            optimizer.step()
        return
    _zero_momentum_buffers(optimizer)
    optimizer.grad_scale, optimizer.found_inf = None, skip
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def _zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers before SGD's first step: fused SGD leaves a skipped first step's
    buffers uninitialised, and ``0 * momentum + grad`` is exactly the first step's buffer."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if p.grad is not None and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
