"""The CFP split of the small-data benchmark: a training set of identities 001-400 and pairs
files among 401-500 (drawn with a fixed seed, and the official protocol's pairs among them).

    python benchmarks/cfp_split.py ../shared/data/cfp data/cfp_train            # training set
    python benchmarks/cfp_split.py ../shared/data/cfp --pairs-only              # pairs again
    python benchmarks/cfp_split.py ../shared/data/cfp data/cfp_train_aligned --align
    python benchmarks/cfp_split.py ../shared/data/cfp data/cfp_200 --align --people 200

The pairs files in benchmarks/cfp/ were written by this script with the default seed; their
paths are relative to that folder, so they find the images at ../shared/data/cfp beside the
repository. Train with `--set rec=data/cfp_train num_classes=400 num_image=5600` and verify
with `facescale eval verification OUTPUT/model.pt --network NET benchmarks/cfp/cfp_*.txt`
(add `--align` to both for a training set of aligned faces, and its pairs aligned alike).
"""

import argparse
import json
from pathlib import Path

from facescale.benchmarking.cfp import SEED, write_split

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cfp", help="the CFP folder (images/, protocol/)")
    parser.add_argument("train", nargs="?", help="output folder of the training set's records")
    parser.add_argument(
        "--pairs", default=str(Path(__file__).parent / "cfp"), help="folder of the pairs files"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the drawn pairs")
    parser.add_argument("--pairs-only", action="store_true", help="write no training set")
    parser.add_argument(
        "--align", action="store_true", help="align the training faces by found landmarks"
    )
    parser.add_argument(
        "--people",
        type=int,
        help="train on the first PEOPLE training people only (how accuracy grows with people)",
    )
    args = parser.parse_args()
    if args.train is None and not args.pairs_only:
        parser.error("give TRAIN, the training set's output folder, or --pairs-only")
    train = None if args.pairs_only else args.train
    report = write_split(
        args.cfp, train, args.pairs, args.seed, align=args.align, train_people=args.people
    )
    print(json.dumps(report))
