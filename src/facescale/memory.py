"""Memory probes: this process's resident memory from Linux ``/proc``, the machine's available
memory, and the peak growth of a measured section on CPU or CUDA."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _kilobytes_line(path: str, field: str) -> int:
    """Bytes of the ``FIELD: N kB`` line of a Linux ``/proc`` file."""
    with open(path) as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{path} has no {field} line (Linux is needed)")


def process_memory(field: str) -> int:
    """Bytes of a ``kB`` line of ``/proc/self/status``: ``VmRSS`` (resident now), ``VmHWM``
    (resident peak) or ``VmData`` (data segment)."""
    return _kilobytes_line("/proc/self/status", field)


def reset_peak_memory() -> None:
    """Restart this process's resident peak (``VmHWM``) from its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def available_memory() -> int:
    """``MemAvailable`` of this machine in bytes (Linux)."""
    return _kilobytes_line("/proc/meminfo", "MemAvailable")


class PeakMemory:
    """Peak memory growth from :meth:`start` on: the resident set on CPU, allocated (and
    reserved) bytes of the caching allocator on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        """Forget earlier peaks; growth is counted from the memory in use now."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        reset_peak_memory()
        self.base = process_memory("VmRSS")

    def peak(self) -> dict[str, int]:
        """``peak_bytes`` above the start, and on CUDA the allocator's ``reserved_bytes``."""
        import torch

        if self.device.type == "cuda":
            return {
                "peak_bytes": torch.cuda.max_memory_allocated(self.device) - self.base,
                "reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        return {"peak_bytes": process_memory("VmHWM") - self.base}
