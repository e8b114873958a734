"""Why ``torch.load(weights_only=True)`` refused a file, worded so that the user can act on it.

A weights-only load reads tensors and plain values and never runs code from the file. Torch's
own refusal suggests turning that safety off, which would run whatever the file holds, so the
reason is given here instead, with a safe way to convert the file.
"""

from __future__ import annotations

import pickle
import re

# torch names the object it refused as "Unsupported global: GLOBAL module.name".
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_refusal(err: Exception) -> str:
    """What is wrong with a file that ``torch.load(weights_only=True)`` raised ``err`` for,
    and what to do; never the advice to load it with the safety off."""
    if isinstance(err, pickle.UnpicklingError):
        found = REFUSED_GLOBAL.search(str(err))
        named = f" ({found.group(1)})" if found else ""
        return (
            f"it holds Python objects{named} besides tensors and plain values, and loading "
            "those could run code; if you trust where the file came from, load it in a "
            "separate Python session, save only its state dicts (for example "
            "torch.save(model.state_dict(), 'weights.pt')) and use that file instead"
        )
    lines = str(err).split(". ")[0].splitlines()
    detail = lines[0] if lines else "the file ends early"
    return f"{detail}; it is truncated, damaged, or was not written by torch.save"
