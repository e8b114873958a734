"""Backbone training-step speed and peak memory per runtime option: fp32, channels-last,
gradient checkpointing, bf16 (`facescale bench backbone`; one fresh process per variant).

    python benchmarks/bench_backbone.py --json                           # r50, batch 16
    python benchmarks/bench_backbone.py --model r100 --batch 8 --json
    python benchmarks/bench_backbone.py --model mbf --variants bf16 --json
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    main(["bench", "backbone", *sys.argv[1:]])
