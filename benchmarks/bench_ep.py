"""Expert-parallel dispatch/combine benchmark (2 and 4 ranks; gloo on the CPU, NCCL with enough GPUs), each against
an all_to_all_single of the same bytes: `python benchmarks/bench_ep.py [--device cpu|cuda] [--quick] [--json PATH]`."""

import sys

from dsv3.bench import main

if __name__ == "__main__":
    main(["ep", *sys.argv[1:]])
