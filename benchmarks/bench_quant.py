"""FP8 quantization benchmark: `python benchmarks/bench_quant.py [--device cpu|cuda] [--quick] [--json PATH]`."""

from dsv3.bench.quant import main

if __name__ == "__main__":
    main()
