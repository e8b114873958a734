"""The memory planner (`facescale plan`) against peaks measured by `facescale bench train`:
runs the benchmark with the given arguments, prints predicted, measured and their ratio per
run, and exits with status 1 if any prediction is off by more than 15%.

    python benchmarks/plan_vs_measured.py --classes 10k 100k 1M 2M --batch 32
"""

import contextlib
import io
import json
import sys

from facescale.cli import main

TOLERANCE = 0.15

if __name__ == "__main__":
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            main(["bench", "train", *sys.argv[1:], "--json"])
        except SystemExit as done:
            if done.code:
                sys.exit(done.code)  # the benchmark printed why on stderr
    report = json.loads(captured.getvalue())
    print(report["plan_markdown"])
    error = report["plan_max_error"]
    print(f"\nlargest error: {error:.1%} (tolerance {TOLERANCE:.0%})")
    sys.exit(0 if error is not None and error <= TOLERANCE else 1)
