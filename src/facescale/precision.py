"""Which reduced precision the backbone computes in, from the ``fp16`` and ``bf16`` keys.

fp16 autocast runs on CUDA only (elsewhere such a run computes in float32, with a warning);
bf16 runs on every device. ``bf16='auto'`` means bf16 where the device computes it natively
(see :func:`native_bf16`), else float32, and yields to ``fp16``. Asking for both fp16 and
``bf16=True`` at once is a config mistake.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from facescale.errors import ConfigError

log = logging.getLogger(__name__)


def check_exclusive(fp16: bool, bf16: bool | str) -> None:
    """Both keys at once is a :class:`ConfigError`: they name two different precisions
    (``bf16='auto'`` yields to fp16)."""
    if fp16 and bf16 is True:
        raise ConfigError("fp16 and bf16 are exclusive; set at most one of them to True")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` has bfloat16 arithmetic in hardware: a CPU with AVX512-BF16 or AMX,
    a CUDA GPU from Ampere on. Elsewhere bf16 is emulated and often slower than float32."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_bf16(fp16: bool, bf16: bool | str, device: torch.device | str) -> bool:
    """The ``bf16`` key on ``device``: 'auto' is on where bf16 is native and fp16 is off."""
    if bf16 == "auto":
        return not fp16 and native_bf16(device)
    return bool(bf16)


def requested_dtype(fp16: bool, bf16: bool) -> torch.dtype | None:
    """The autocast dtype the keys ask for on any device: float16, bfloat16 or None (float32)."""
    check_exclusive(fp16, bf16)
    return torch.float16 if fp16 else torch.bfloat16 if bf16 else None


def device_dtype(fp16: bool, bf16: bool | str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a run on ``device`` computes the backbone in (fp16 only on CUDA,
    ``bf16='auto'`` resolved for the device), without a word: for estimates that ask many
    times."""
    dtype = requested_dtype(fp16, resolve_bf16(fp16, bf16, device))
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        return None
    return dtype


def autocast_dtype(fp16: bool, bf16: bool | str, device: torch.device | str) -> torch.dtype | None:
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
