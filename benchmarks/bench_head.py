"""The classification head alone: step time vs its matmul floor, memory vs its budget
(`facescale bench head`; 2 gloo ranks on CPU, NCCL on GPUs).

    python benchmarks/bench_head.py --json                                # 1M classes, rate 1
    python benchmarks/bench_head.py --sample-rate 0.1 --json              # Partial FC 0.1
    python benchmarks/bench_head.py --classes 100000 --kind data_parallel --json
    python benchmarks/bench_head.py --classes 20000 --steps 2 --json      # a quick look
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    main(["bench", "head", *sys.argv[1:]])
