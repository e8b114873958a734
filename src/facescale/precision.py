"""Which reduced precision the backbone computes in, from the ``fp16`` and ``bf16`` keys.

fp16 autocast runs on CUDA only (elsewhere such a run computes in float32, with a warning);
bf16 runs on every device. Asking for both at once is a config mistake.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from facescale.errors import ConfigError

log = logging.getLogger(__name__)


def check_exclusive(fp16: bool, bf16: bool) -> None:
    """Both keys at once is a :class:`ConfigError`: they name two different precisions."""
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are exclusive; set at most one of them to True")


def requested_dtype(fp16: bool, bf16: bool) -> torch.dtype | None:
    """The autocast dtype the keys ask for on any device: float16, bfloat16 or None (float32)."""
    check_exclusive(fp16, bf16)
    return torch.float16 if fp16 else torch.bfloat16 if bf16 else None


def device_dtype(fp16: bool, bf16: bool, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a run on ``device`` computes the backbone in (fp16 only on CUDA),
    without a word: for estimates that ask many times."""
    dtype = requested_dtype(fp16, bf16)
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        return None
    return dtype


def autocast_dtype(fp16: bool, bf16: bool, device: torch.device | str) -> torch.dtype | None:
    """:func:`device_dtype`, warning when fp16 was asked for and the run stays in float32."""
    dtype = device_dtype(fp16, bf16, device)
    if fp16 and dtype is None:
        log.warning("fp16 needs a GPU; running in float32 (set bf16=True for bfloat16 on CPU)")
    return dtype


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matrix products and convolutions in full float32 (no TF32 or bf16 shortcuts),
    whatever the process set: for references and error bounds that assume float32."""
    matmul = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
