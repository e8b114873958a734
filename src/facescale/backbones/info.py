"""Parameter count, fp32 size and compute of a backbone for one 112x112 image.

Compute comes from torch's own FLOP counter (``torch.utils.flop_counter``), run on the meta
device so that no memory is allocated, even for r2060. It counts convolutions and matrix
products (including attention) as 2 FLOPs per multiply-add; the small elementwise work of
BatchNorm, PReLU, LayerNorm and softmax is not counted. We report multiply-adds (MACs =
FLOPs / 2), the unit of the published face-recognition figures.

One formula is replaced: torch counts the input gradient of a grouped (depthwise)
convolution as if the convolution were dense, ``groups`` times too much, which would
inflate MobileFaceNet's backward pass in the training-step counts of ``facescale bench``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facescale.backbones.registry import get_model
from facescale.face import FACE_SIZE

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


def _conv_backward_flops(
    grad_out_shape: torch.Size,
    x_shape: torch.Size,
    w_shape: torch.Size,
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: list[bool],
    out_shape: object = None,
) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs one forward."""
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the grouped-convolution backward counted right."""
    conv_backward = torch.ops.aten.convolution_backward
    return FlopCounterMode(display=False, custom_mapping={conv_backward: _conv_backward_flops})


def count_macs(model: nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds of one inference forward of ``model`` on ``images``."""
    with torch.no_grad(), flop_counter() as counter:
        model(images)
    return counter.get_total_flops() // 2


def model_info(name: str, embedding_size: int = 512, **kwargs: Any) -> ModelInfo:
    """Build ``name`` on the meta device and measure it; ``kwargs`` go to ``get_model``."""
    with torch.device("meta"):
        model = get_model(name, embedding_size, **kwargs).eval()
        images = torch.empty(1, 3, FACE_SIZE, FACE_SIZE)
    return ModelInfo(
        name=name,
        embedding_size=embedding_size,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=count_macs(model, images),
    )
