"""Static report of the kernels: compiled for a GPU target without a GPU, read from the machine code, with a
bandwidth prediction; the same as `lofit bench --static`.

    python benchmarks/bench_static.py                       # sm_90: Llama-2 7B / 13B layers, 4k and 16k tokens
    python benchmarks/bench_static.py --target 80,90 --case step1-backward

Options, the model and the JSON format: benchmarks/README.md (or `--help`);
the code: lofit_fast/bench/static.py.
"""

import sys

from lofit_fast.bench.static import main

if __name__ == "__main__":
    sys.exit(main())
