"""Kernel microbenchmark of the LoFiT head transform; the same as `lofit bench`.

    python benchmarks/bench_kernels.py --impl torch,triton --mode full --shape llama2-7b --tokens 4k --k 2
    python benchmarks/bench_kernels.py --quick
    python benchmarks/bench_kernels.py --cpu-target

Options, what is measured and the JSON format: benchmarks/README.md (or `--help`);
the code: lofit_fast/bench/kernels.py.
"""

import sys

from lofit_fast.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
