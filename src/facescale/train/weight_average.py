"""An exponential moving average of the backbone's weights (config key ``ema_decay``).

The average, not the last step's weights, is what a run evaluates and saves as ``model.pt``:
it smooths the noise of the last steps, which matters most on small datasets. Each taken step
moves every floating-point entry of the state dict (weights and BatchNorm statistics) by
``1 - d`` towards the backbone, where ``d = min(ema_decay, (1 + n) / (10 + n))`` after ``n``
taken steps, so early steps are not outweighed by the random initialisation. The step's skip
flag is read on the device: a skipped step moves nothing, and no host synchronisation is needed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


class WeightAverage:
    """The average as a module of its own (:attr:`model`), the backbone's deep copy."""

    def __init__(self, backbone: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(backbone).requires_grad_(False).eval()
        device = next(iter(backbone.state_dict().values())).device
        self.taken = torch.zeros((), dtype=torch.float64, device=device)  # steps averaged in

    def update(self, backbone: nn.Module, skip: Tensor) -> None:
        """Average the backbone's state in, unless ``skip`` (0-d, nonzero: step not taken)."""
        taken = 1.0 - skip.double()
        self.taken += taken
        decay = torch.clamp((1.0 + self.taken) / (10.0 + self.taken), max=self.decay)
        weight = ((1.0 - decay) * taken).float()
        averages, currents = [], []
        for average, current in zip(
            self.model.state_dict().values(), backbone.state_dict().values(), strict=True
        ):
            if average.is_floating_point():
                averages.append(average)
                currents.append(current.detach())
            else:  # counters such as BatchNorm's num_batches_tracked follow the backbone
                average.copy_(current)
        torch._foreach_lerp_(averages, currents, weight)

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken.clone(), "model": self.model.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.taken.copy_(state["taken"])
        self.model.load_state_dict(state["model"])
