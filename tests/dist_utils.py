"""Real gloo ranks for multi-process tests, with a short collective timeout so that a rank
stuck in a collective fails its test within minutes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from facescale.launch import spawn_ranks


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``spawn_ranks(fn, world, *args)`` whose collectives give up after five minutes."""
    return spawn_ranks(fn, world, *args, timeout_minutes=5)
