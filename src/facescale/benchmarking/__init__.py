"""Benchmarks behind `facescale bench`, one module each."""

from __future__ import annotations

import json
from typing import Any


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """A benchmark's report: one JSON object, or one aligned ``key value`` line per entry."""
    if as_json:
        print(json.dumps(report))
        return
    width = max(map(len, report), default=0)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
