"""End-to-end LoFiT step-2 training benchmark on quantized bases; the same as `lofit bench --e2e`.

    python benchmarks/bench_e2e.py                                  # GPU: llama2-7b, llama2-13b x nf4, int8
    python benchmarks/bench_e2e.py --models llama2-13b --quant nf4
    python benchmarks/bench_e2e.py --quick                          # CPU smoke run

Options, what is measured and the JSON format: benchmarks/README.md (or `--help`);
the code: lofit_fast/bench/e2e.py.
"""

import sys

from lofit_fast.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
