"""The small-data ablation on the CFP split: each variant (the demo recipe, one change against
it, the small_real recipe and changes against that) trains for the same time budget on people
001-400 and is verified on the kept pairs among 401-500 (benchmarks/cfp/).

    python benchmarks/cfp_split.py ../shared/data/cfp data/cfp_train
    python benchmarks/cfp_ablation.py data/cfp_train --budget 45m --variants demo arcface r18
    python benchmarks/cfp_ablation.py data/cfp_train --variants small_real+dropout=0.2
    python benchmarks/cfp_ablation.py data/cfp_train_aligned --align --variants small_real

A variant is one of the named ones, or CONFIG+KEY=VALUE+... (a config with `--set` changes).
"""

import argparse
import json
from pathlib import Path

from facescale.benchmarking.ablation import VARIANTS, run_ablation

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", help="the training set's records (benchmarks/cfp_split.py)")
    parser.add_argument("--budget", default="45m", help="time budget of each variant")
    known = ", ".join(VARIANTS)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help=f"{known}, or CONFIG+KEY=VALUE+..."
    )
    parser.add_argument("--output", default="work_dirs/cfp_ablation", help="runs' folder")
    parser.add_argument("--ranks", type=int, default=2, help="training processes")
    parser.add_argument(
        "--align",
        action="store_true",
        help="verify on faces aligned by found landmarks (a training set made with --align)",
    )
    pairs = sorted((Path(__file__).parent / "cfp").glob("cfp_*.txt"))
    args = parser.parse_args()
    rows = run_ablation(
        args.variants,
        Path(args.train).resolve(),
        pairs,
        args.budget,
        Path(args.output).resolve(),
        args.ranks,
        args.align,
    )
    print(json.dumps({"budget": args.budget, "ranks": args.ranks, "rows": rows}, indent=1))
