"""The one interface a training loop uses for every head kind."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class TrainableHead(Protocol):
    """A classification head that owns its optimizer and its shard of the class centers.

    The loop calls the head for the loss, backpropagates, then reads this rank's part of the
    squared gradient norm (summed over ranks it is the global one), steps with the LR and the
    factor the gradient needs (clipping, loss-scale), and forgets the gradient. The LR, the
    factor and ``skip`` (nonzero: the step changes nothing) may be 0-d tensors on the head's
    device, so that the loop never waits for the device to decide; ``sizes`` (every rank's
    rows) tell the head that the caller has checked the inputs. The head's
    classes are ``[class_start, class_start + num_local)``; ``checkpoint_state`` is None for a
    head that is not saved.
    """

    class_start: int
    num_local: int

    def __call__(
        self, embeddings: Tensor, labels: Tensor, sizes: list[int] | None = None
    ) -> Tensor: ...

    def configure_optimizer(
        self, kind: str, lr: float, momentum: float, weight_decay: float
    ) -> None: ...

    def grad_norm_sq(self) -> Tensor: ...

    def step(
        self, lr: float | Tensor, grad_scale: float | Tensor = 1.0, skip: Tensor | None = None
    ) -> None: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def checkpoint_state(self) -> dict[str, Any] | None: ...

    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...

    def to(self, device: torch.device) -> TrainableHead: ...
