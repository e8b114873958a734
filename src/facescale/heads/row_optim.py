"""Optimizer updates of chosen rows of the centers, by torch's own SGD and AdamW functions.

The lean head updates its centers chunk by chunk, so each update works on a block of rows
and the matching blocks of the optimizer state; rows outside the block are never touched.
torch's fused kernels are used where the installed torch has them for the device; narrow
tables take SGD with each operation rounded once (:meth:`RowSGD.update_by_operation`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

_SGD_DEFAULTS = {"weight_decay": 0.0, "dampening": 0.0, "nesterov": False, "maximize": False}


@functools.cache
def fused_kwargs(device_type: str) -> dict[str, bool]:
    """``{"fused": True}`` where this torch has fused SGD/AdamW kernels for the device, else {}."""
    if "fused" not in inspect.signature(torch_sgd).parameters:
        return {}
    probe = torch.zeros(1, device=device_type)
    try:
        torch_sgd(
            [probe], [probe.clone()], [None], fused=True, **_SGD_DEFAULTS, momentum=0.0, lr=0.0
        )
    except (RuntimeError, NotImplementedError):
        return {}
    return {"fused": True}


@dataclass(frozen=True)
class RowSGD:
    """SGD with momentum (dampening 0) and L2 weight decay: ``torch.optim.SGD``'s update."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def update(
        self,
        weight: Tensor,
        state: dict[str, Tensor],
        grad: Tensor,
        lr: float | Tensor,
        done: Tensor,
        found_inf: Tensor | None = None,
    ) -> None:
        """Update ``weight`` and ``state`` blocks in place with torch's own SGD function;
        nothing changes where ``found_inf`` is nonzero (fused kernels only)."""
        settings = {**_SGD_DEFAULTS, "weight_decay": self.weight_decay}
        torch_sgd(
            [weight],
            [grad],
            [state.get("momentum_buffer")],
            momentum=self.momentum,
            lr=lr,
            **settings,
            **fused_kwargs(weight.device.type),
            found_inf=found_inf,
        )

    def update_by_operation(
        self, weight: Tensor, momentum: Tensor | None, grad: Tensor, lr: float | Tensor
    ) -> None:
        """The same update with each operation rounded once (torch's kernels may fuse a
        multiply-add): the narrow tables' SGD, which ``narrow_store.c`` computes bit for bit
        while it stores them."""
        step = torch.mul(weight, self.weight_decay).add_(grad)
        if momentum is not None:
            step = momentum.mul_(self.momentum).add_(step)
        weight.sub_(torch.mul(step, lr))


@dataclass(frozen=True)
class RowAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments): ``torch.optim.AdamW``'s update.

    ``done`` counts the head's optimizer steps; a row that was not sampled in some steps
    still uses that count for bias correction, as ``torch.optim.SparseAdam`` does.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    state_names = ("exp_avg", "exp_avg_sq")

    def update(
        self,
        weight: Tensor,
        state: dict[str, Tensor],
        grad: Tensor,
        lr: float | Tensor,
        done: Tensor,
        found_inf: Tensor | None = None,
    ) -> None:
        """Update ``weight`` and ``state`` blocks in place after ``done`` steps (a 0-d float32
        tensor on the device); nothing changes where ``found_inf`` is nonzero (fused only)."""
        torch_adamw(
            [weight],
            [grad],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            [],
            [done.clone()],  # the call counts this step in it
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
            **fused_kwargs(weight.device.type),
            found_inf=found_inf,
        )


RowOptimizer = RowSGD | RowAdamW


def make_row_optimizer(
    kind: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> RowOptimizer:
    """The row-wise update named ``kind`` ('sgd' or 'adamw')."""
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"optimizer: lr={lr} must be > 0 and weight_decay={weight_decay} >= 0")
    if kind == "sgd":
        if not 0 <= momentum < 1:
            raise ValueError(f"optimizer 'sgd': momentum={momentum} must be in [0, 1)")
        return RowSGD(lr, momentum, weight_decay)
    if kind == "adamw":
        if not all(0 <= b < 1 for b in betas) or eps <= 0:
            raise ValueError(f"optimizer 'adamw': betas={betas} must be in [0, 1), eps={eps} > 0")
        return RowAdamW(lr, tuple(betas), eps, weight_decay)
    raise ValueError(f"optimizer {kind!r} is not supported by the lean head; use 'sgd' or 'adamw'")
