"""Loader images/s, random vs sequential, 0/1/2 workers, vs the JPEG decode floor.

python benchmarks/bench_data.py --json                 # 16,384 images, best of 2 rounds
python benchmarks/bench_data.py --images 4096 --json   # a quick look
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    main(["bench", "data", *sys.argv[1:]])
