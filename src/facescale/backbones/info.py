"""Parameter count, fp32 size and compute of a backbone for one 112x112 image.

Compute comes from torch's own FLOP counter (``torch.utils.flop_counter``), run on the meta
device so that no memory is allocated, even for r2060. It counts convolutions and matrix
products (including attention) as 2 FLOPs per multiply-add; the small elementwise work of
BatchNorm, PReLU, LayerNorm and softmax is not counted. We report multiply-adds (MACs =
FLOPs / 2), the unit of the published face-recognition figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facescale.backbones.base import INPUT_SIZE
from facescale.backbones.registry import get_model

MIB = 2**20


@dataclass(frozen=True)
class ModelInfo:
    """Size and cost of one backbone; ``macs`` is for a single 112x112 image at inference."""

    name: str
    embedding_size: int
    parameters: int
    trainable_parameters: int
    macs: int

    @property
    def fp32_mib(self) -> float:
        return self.parameters * 4 / MIB

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fp32_mib": self.fp32_mib, "gmacs": self.gmacs}


def count_macs(model: nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds of one inference forward of ``model`` on ``images``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() // 2


def model_info(name: str, embedding_size: int = 512, **kwargs: Any) -> ModelInfo:
    """Build ``name`` on the meta device and measure it; ``kwargs`` go to ``get_model``."""
    with torch.device("meta"):
        model = get_model(name, embedding_size, **kwargs).eval()
        images = torch.empty(1, 3, INPUT_SIZE, INPUT_SIZE)
    return ModelInfo(
        name=name,
        embedding_size=embedding_size,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=count_macs(model, images),
    )
