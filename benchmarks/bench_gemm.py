"""FP8 block-scaled GEMM benchmark: `python benchmarks/bench_gemm.py [--device cpu|cuda] [--quick] [--json PATH]`."""

import sys

from dsv3.bench import main

if __name__ == "__main__":
    main(["gemm", *sys.argv[1:]])
