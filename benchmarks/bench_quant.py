"""FP8 quantization benchmark: `python benchmarks/bench_quant.py [--device cpu|cuda] [--quick] [--json PATH]`."""

import sys

from dsv3.bench import main

if __name__ == "__main__":
    main(["quant", *sys.argv[1:]])
