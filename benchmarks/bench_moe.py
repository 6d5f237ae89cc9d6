"""MoE routing and layout benchmark: `python benchmarks/bench_moe.py [--device cpu|cuda] [--quick] [--json PATH]`."""

import sys

from dsv3.bench import main

if __name__ == "__main__":
    main(["moe", *sys.argv[1:]])
