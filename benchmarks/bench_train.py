"""Real training steps: samples/s and peak memory per rank for data parallel, model parallel
and Partial FC as identities grow (`facescale bench train`; one torchrun job per cell).

    python benchmarks/bench_train.py --classes 10k 100k 1M 2M 4M --plot train.png   # CPU, mbf
    python benchmarks/bench_train.py --network r50 --precision fp16 --batch 128 \
        --classes 125k 1.4M 5.5M 8M 16M 29M --plot train_gpu.png                   # GPUs
    python benchmarks/bench_train.py --classes 200 --parallel model --rec REC --workers 1 --comm
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    main(["bench", "train", *sys.argv[1:]])
