"""Exact all-to-all TAR@FAR speed vs this machine's sgemm rate (`facescale bench tarfar`).

python benchmarks/bench_tarfar.py --json            # 200,000 x 512 features
python benchmarks/bench_tarfar.py --n 20000 --json  # a quick look
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    main(["bench", "tarfar", *sys.argv[1:]])
