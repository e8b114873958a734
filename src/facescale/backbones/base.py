"""What every backbone shares: the forward contract, mixed precision and gradient checkpointing.

A backbone maps face crops ``[B, 3, 112, 112]`` in [-1, 1] to float32 embeddings
``[B, embedding_size]``. Its body may run under fp16/bf16 autocast; its embedding head always
runs in full precision, as arcface_torch does, so the embeddings never overflow in fp16.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from facescale.errors import InputError
from facescale.face import FACE_SIZE


def autocast_to(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device_type``; with ``dtype`` None, whatever is active stays."""
    if dtype is None or not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def full_precision(device_type: str) -> AbstractContextManager:
    """Switch autocast off on ``device_type``, for the parts that must not run in fp16/bf16."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or kept in float64 (the reference precision of the tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates (BatchNorm running statistics) made while a segment is recomputed."""
    buffers = list(module.buffers())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def _recompute_contexts(segment: nn.Module) -> tuple[AbstractContextManager, ...]:
    return nullcontext(), _buffers_kept(segment)


class Backbone(nn.Module, abc.ABC):
    """Base of all backbones: a body (autocast allowed) followed by a full-precision head.

    Runtime options are plain attributes set by :func:`facescale.backbones.get_model`:
    ``amp_dtype`` (None, torch.float16 or torch.bfloat16), ``gradient_checkpointing`` and
    ``channels_last`` (see :meth:`to_channels_last`).
    """

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        if embedding_size <= 0:
            raise InputError(f"embedding_size must be a positive integer, got {embedding_size}")
        self.embedding_size = embedding_size
        self.amp_dtype: torch.dtype | None = None
        self.gradient_checkpointing = False
        self.channels_last = False

    @abc.abstractmethod
    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        """Images to the features the head takes; runs under autocast if ``amp_dtype`` is set."""

    @abc.abstractmethod
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features to embeddings; always runs with autocast off."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        device_type = images.device.type
        with autocast_to(device_type, self.amp_dtype):
            features = self.forward_body(images)
        with full_precision(device_type):
            return self.forward_head(at_least_fp32(features))

    def run_blocks(self, blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """Apply ``blocks`` in order; when training with checkpointing, keep only segment inputs.

        The blocks are cut into about sqrt(n) segments of sqrt(n) blocks, so a stage of n
        blocks holds O(sqrt(n)) activations instead of O(n), for one extra forward pass.
        Recomputation replays the same random numbers and leaves BatchNorm statistics as the
        first pass left them, so results equal those without checkpointing.
        """
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            for block in blocks:
                x = block(x)
            return x
        size = math.ceil(math.sqrt(len(blocks)))
        for start in range(0, len(blocks), size):
            segment = nn.Sequential(*blocks[start : start + size])
            contexts = partial(_recompute_contexts, segment)
            x = checkpoint(segment, x, use_reentrant=False, context_fn=contexts)
        return x

    def to_channels_last(self) -> Backbone:
        """Keep conv weights and feed images in NHWC layout (faster convolutions on GPUs)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)


def _check_images(images: torch.Tensor) -> None:
    expected = (3, FACE_SIZE, FACE_SIZE)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"backbone input must be face crops of shape [B, 3, {FACE_SIZE}, {FACE_SIZE}] "
            f"(aligned RGB), got {list(images.shape)}; resize or align the images first"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"backbone input must be a floating-point tensor in [-1, 1], got {images.dtype}; "
            "convert uint8 images with facescale.face.to_model_input"
        )
