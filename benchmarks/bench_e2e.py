"""End-to-end generation vs transformers: `python benchmarks/bench_e2e.py [--device D] [--quick] [--json PATH]`."""

import sys

from dsv3.bench import main

if __name__ == "__main__":
    main(["e2e", *sys.argv[1:]])
