#!/usr/bin/env bash
# One command for a machine with one H100 or H200 (at most 8 minutes): the kernel-facing tests on CUDA, the kernel
# microbenchmark on Llama-2 7B / 13B layers at 4k and 16k tokens, and training steps 1 and 2 on a 13B-shaped NF4
# model at seq 512 under a 24 GB cap. Everything goes to one folder, 6 files:
#
#   summary.txt   device, versions, and per step its command, exit status and seconds
#   tests.log     pytest on CUDA: the op and kernel tests, patching, quantized bases, adapters (compiled kernels,
#                 deterministic mode: one config per launch, so the run compiles instead of tuning)
#   kernels.json  kernels.log    lofit bench (CUDA-graph device times and host times; autotuned kernels)
#   e2e.json      e2e.log        lofit bench --e2e, method step1 (scales on every head) and step2 (offsets on 48 heads)
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTPUT_FOLDER]     (default folder: $OUT, else gpu_check_<date>)
#
# --dry-run runs the same steps on the CPU at toy sizes (a few tests in Triton's interpreter, tiny shapes), to check
# the script itself. No step downloads anything: models are built from configs with random weights. Each step has a
# time limit, so a slow step is cut off (and says so in summary.txt) rather than the whole run.
set -uo pipefail

dry_run=0
folder=""
for argument in "$@"; do
    case "$argument" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $argument" >&2; exit 2 ;;
        *) folder="$argument" ;;
    esac
done
folder="${folder:-${OUT:-gpu_check_$(date +%F)}}"
# Compiled kernels on the GPU; the dry run asks for the interpreter where it wants it.
unset TRITON_INTERPRET
python="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
mkdir -p "$folder"
summary="$folder/summary.txt"
: > "$summary"

if [ "$dry_run" = 0 ] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here; run with --dry-run to check the script on the CPU" >&2
    exit 2
fi

{
    echo "gpu_check $(date -Is)  dry_run=$dry_run  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    "$python" - <<'EOF'
import platform
import torch
import triton
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}")
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    print(f"device {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
          f"sm_{properties.major}{properties.minor}, {properties.multi_processor_count} multiprocessors")
else:
    print("device: CPU (dry run)")
EOF
} >> "$summary" 2>&1

failures=0
# step NAME SECONDS LOG COMMAND...: run with a time limit, output to LOG, a line to the summary.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local started=$SECONDS
    echo "== $name: $*" >&2
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local status=$?
    local took=$((SECONDS - started))
    local note=""
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        note="  (cut off at the ${limit} s limit)"
    fi
    echo "$name: exit $status, ${took} s$note; $*" >> "$summary"
    [ "$status" = 0 ] || failures=$((failures + 1))
}

if [ "$dry_run" = 1 ]; then
    # The training-shaped kernel variants in Triton's interpreter; the benchmarks on the torch path (the interpreter
    # would only make them slow).
    step tests 300 "$folder/tests.log" env TRITON_INTERPRET=1 "$python" -m pytest -q -p no:cacheprovider \
        tests/test_ops.py -k "kernel_variant and model"
    step kernels 300 "$folder/kernels.log" "$python" benchmarks/bench_kernels.py --quick --device cpu --threads 1 \
        --impl torch,eager_hook --mode full --k 2 --output "$folder/kernels.json"
    step e2e 300 "$folder/e2e.log" "$python" benchmarks/bench_e2e.py --quick --device cpu --models llama2-13b \
        --quant nf4 --method step1,step2 --impl floor,lofit_fast --output "$folder/e2e.json"
else
    # Fixed configs for the tests: each launch compiles one config instead of tuning (minutes saved); the
    # benchmarks below run the autotuned kernels.
    step tests 210 "$folder/tests.log" env LOFIT_FAST_DETERMINISTIC=1 "$python" -m pytest -q -p no:cacheprovider \
        tests/test_ops.py tests/test_routed_ops.py tests/test_warmup.py tests/test_patch.py tests/test_quantized.py \
        tests/test_multi_adapter.py tests/test_adapter.py
    step kernels 100 "$folder/kernels.log" "$python" benchmarks/bench_kernels.py --impl triton,torch,eager_hook \
        --shape llama2-7b,llama2-13b --tokens 4k,16k --k all,2 --mode forward,backward,full \
        --output "$folder/kernels.json"
    step e2e 150 "$folder/e2e.log" "$python" benchmarks/bench_e2e.py --models llama2-13b --quant nf4 --seq 512 \
        --cap-gb 24 --method step1,step2 --impl floor,lofit_fast,eager_hook --max-batch 16 --steps 3 \
        --no-own-batch --output "$folder/e2e.json"
fi

echo "failed steps: $failures" >> "$summary"
cat "$summary"
exit $((failures > 0))
