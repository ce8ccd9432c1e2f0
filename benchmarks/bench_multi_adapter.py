"""One batch mixing many LoFiT adapters (a row each) against the adapters run one after another.

    python benchmarks/bench_multi_adapter.py                        # CPU defaults: 4 layers, hidden 512, A = 2, 4, 8
    python benchmarks/bench_multi_adapter.py --adapters 8 --kinds offset --batch 32 --new-tokens 32
    python benchmarks/bench_multi_adapter.py --device cuda --layers 32 --hidden 4096 --heads 32 \
        --intermediate 11008 --vocab 32000 --batch 64 --seq 512 --new-tokens 64

Options, what is measured and the JSON format: benchmarks/README.md (or `--help`);
the code: lofit_fast/bench/multi.py.
"""

import sys

from lofit_fast.bench.multi import main

if __name__ == "__main__":
    sys.exit(main())
