"""The narrow tables' one-pass store and SGD step (``narrow_store.c``), compiled once per
machine with the C compiler at hand and loaded with ctypes.

The lean head rounds and stores each narrow block with it on CPU: noise, rounding, narrowing
and the scatter to the table's rows in one pass over the block, where the torch path makes
four to ten; under SGD the update joins that pass, reading the momentum in its stored form,
and forms each row's raw gradient from the gradient to the normalised row on the way. Given
the raw gradient, both paths store the same bits (tests/test_heads_storage.py); forming it,
they agree to rounding. A machine without a compiler (or a GPU) only runs slower. The
library is cached under ``$XDG_CACHE_HOME/facescale`` (``~/.cache`` by default), keyed by
the source, the compiler, its flags and the machine.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("facescale.heads")

SOURCE = "narrow_store.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno")
OPENMP = "-fopenmp"  # dropped where the compiler lacks it: the rows are then stored in turn
KINDS = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}  # narrow_store.c's enum kind


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facescale"


@functools.cache
def narrow_store() -> ctypes.CDLL | None:
    """The compiled store kernels, or None (logged once) where they cannot be built."""
    source = resources.files("facescale.heads").joinpath(SOURCE).read_bytes()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise OSError("no C compiler (cc or gcc) on PATH and CC unset")
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, check=True, timeout=30
        ).stdout
        build = " ".join([*FLAGS, OPENMP, platform.machine()]).encode()
        key = hashlib.sha256(source + version + build).hexdigest()[:16]
        library = cache_folder() / f"narrow_store-{key}.so"
        if not library.is_file():
            _build(compiler, source, library)
        return _declare(ctypes.CDLL(str(library)))
    except (OSError, subprocess.SubprocessError) as error:
        log.info("narrow storage: the one-pass store is not built (%s); torch stores", error)
        return None


def _build(compiler: str, source: bytes, library: Path) -> None:
    """Compile ``source`` to ``library``: written under a temporary name, renamed when whole."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as folder:
        code, built = Path(folder) / SOURCE, Path(folder) / library.name
        code.write_bytes(source)
        for flags in ((*FLAGS, OPENMP), FLAGS):
            command = [compiler, *flags, "-o", str(built), str(code), "-lm"]
            done = subprocess.run(command, capture_output=True, timeout=300)
            if done.returncode == 0:
                os.replace(built, library)
                return
        raise OSError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')[-500:]}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    common = [pointer, size, size, pointer, pointer, pointer]  # block, count, dim, noise, table
    for name in ("store_bf16", "store_fp16"):
        getattr(lib, name).argtypes = [*common, pointer, size, number]
    lib.store_int8.argtypes = [*common, pointer, pointer, size, number, number]
    real = ctypes.c_float
    lib.sgd_store.argtypes = [
        *(pointer, pointer, size, size, pointer, pointer, pointer, size),  # block .. first
        *(number, pointer, number, pointer, pointer),  # the tables
        *(real, real, real, number, number),  # lr, momentum, decay, radial, threads
    ]
    return lib


def sgd_kernel_on(device: torch.device) -> bool:
    """Whether :func:`native_sgd_store` runs on ``device`` (a CPU, with the kernels built)."""
    return device.type == "cpu" and narrow_store() is not None


def _applies(first: Tensor, tensors: tuple[Tensor | None, ...]) -> ctypes.CDLL | None:
    """The kernels where they apply to ``first`` and ``tensors`` (on CPU, contiguous)."""
    lib = narrow_store() if first.device.type == "cpu" else None
    if lib is None or not all(t is None or t.is_contiguous() for t in (first, *tensors)):
        return None
    return lib


def _where(rows: slice | Tensor) -> tuple[Tensor | None, int]:
    """The kernels' row ids (int64, contiguous; None for a range) and first row of ``rows``."""
    if isinstance(rows, slice):
        return None, rows.start
    return rows.to(torch.int64).contiguous(), 0


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def native_store(
    kind: str,
    block: Tensor,
    row_noise: Tensor,
    column_noise: Tensor,
    table: Tensor,
    rows: slice | Tensor,
    scales: Tensor | None = None,
    nonnegative: bool = False,
) -> bool:
    """Round ``block`` (fp32 ``[n, dim]``, overwritten for int8) with the noise of
    :func:`facescale.heads.storage.noise_terms` and store it in ``table`` at ``rows`` (and the
    int8 scales in ``scales``); False, storing nothing, where the kernels do not apply."""
    lib = _applies(block, (row_noise, column_noise, table, scales))
    if lib is None:
        return False
    ids, first = _where(rows)
    head = (block.data_ptr(), len(block), block.shape[1], row_noise.data_ptr())
    noise_table = (column_noise.data_ptr(), table.data_ptr())
    where, threads = (_pointer(ids), first), torch.get_num_threads()
    if kind == "int8":
        lib.store_int8(*head, *noise_table, scales.data_ptr(), *where, nonnegative, threads)
    else:
        getattr(lib, f"store_{kind}")(*head, *noise_table, *where, threads)
    return True


def native_sgd_store(
    block: Tensor | None,
    grad: Tensor,
    rows: slice | Tensor,
    noise: tuple[Tensor, Tensor],
    centers: tuple[str, Tensor],
    momentum: tuple[str, Tensor, Tensor | None] | None,
    factors: tuple[float, float],
    lr: float | Tensor,
    radial: bool = False,
) -> bool:
    """One SGD step of the centers ``block`` (fp32, overwritten; None: read from their
    table) with ``grad``, stored with the rows' noise
    (:func:`facescale.heads.storage.noise_terms`) to the ``centers`` table (kind, tensor) and
    its ``momentum`` (kind, table, int8 scales; None without momentum); ``factors`` are the
    momentum and the weight decay. With ``radial``, ``grad`` is the gradient to the
    normalised rows, turned into the raw rows' gradient in the same pass
    (:func:`facescale.heads.lean.raw_center_grad_`, its sums in another order: not the
    torch path's bits). The arithmetic of
    :meth:`facescale.heads.row_optim.RowSGD.update_by_operation`; False, changing nothing,
    where the kernels do not apply."""
    center_kind, center_table = centers
    state_kind, state_table, scales = momentum or ("fp32", None, None)
    lib = _applies(grad, (block, *noise, center_table, state_table, scales))
    if lib is None:
        return False
    ids, first = _where(rows)
    lib.sgd_store(
        *(_pointer(block), grad.data_ptr(), len(grad), grad.shape[1]),
        *(noise[0].data_ptr(), noise[1].data_ptr(), _pointer(ids), first),
        *(KINDS[center_kind], center_table.data_ptr()),
        *(KINDS[state_kind], _pointer(state_table), _pointer(scales)),
        *(float(lr), *factors, int(radial), torch.get_num_threads()),
    )
    return True
