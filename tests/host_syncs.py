"""Records the torch calls that make the host wait for the device's values (a CPU stand-in
for CUDA's sync debug mode, which only a GPU has)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# calls whose result is a host value, or whose output size depends on the tensor's values
SYNCING = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "cpu",
    "numpy",
    "equal",
    "allclose",
    "bincount",
    "repeat_interleave",
}


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


def _host_value(name: str, args: tuple) -> bool:
    """``t[index] = 2.0``: on a GPU the number is copied from the host, and that waits."""
    return name == "__setitem__" and len(args) > 2 and not torch.is_tensor(args[2])


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as syncs:`` lists in ``syncs.calls`` every syncing call made inside."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        indexing = name in ("__getitem__", "__setitem__")
        if name in SYNCING or (indexing and _bool_index(args)) or _host_value(name, args):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
