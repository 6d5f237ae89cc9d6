"""MLA decode benchmark: `python benchmarks/bench_mla.py [--device cpu|cuda] [--quick] [--json PATH]`."""

import sys

from dsv3.bench import main

if __name__ == "__main__":
    main(["mla", *sys.argv[1:]])
