"""Kernel microbenchmark of the LoFiT head transform: `lofit bench` and `benchmarks/bench_kernels.py`.

    lofit bench                                         # every impl, mode, shape, token count and K
    lofit bench --impl torch,triton --mode full --shape llama2-7b --tokens 4k --k 2
    lofit bench --quick                                 # tiny shapes, a smoke run (CI)
    lofit bench --cpu-target                            # the CPU acceptance numbers: overhead over o_proj

Times the paper's per-head hook, the op's torch path, torch.compile of it and the Triton kernels, in forward,
backward and both, and gives GB/s against the bytes the fused design must move (`op_bytes`) and a copy of z.
One row per (implementation, mode, shape, tokens, K): a table on stdout, progress on stderr, and JSON in
`benchmarks/results/<device>-<date>.json`. The implementations, modes, byte counts, timing, the CPU target
and the JSON keys are described in benchmarks/README.md.
"""

import argparse
import contextlib
import os
import re
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..ops import head_affine, head_affine_torch_forward, triton_interpreter_enabled
from .common import (
    DTYPES,
    MODES,
    SHAPES,
    Budget,
    add_run_arguments,
    aligned_table,
    comma_list,
    device_ms,
    eager_hook_transform,
    format_number,
    free_memory,
    interleaved_ms,
    op_bytes,
    output_path,
    parse_tokens,
    peak_mb,
    pick_device,
    progress,
    run_header,
    selected_heads,
    time_ms,
    write_results,
)

QUICK_SHAPES = {"tiny": (8, 32)}
TOKENS = (4096, 16384)
QUICK_TOKENS = (256,)
KS = ("all", 2)
IMPLS = ("eager_hook", "torch", "torch_compile", "triton")
PARAMS = ("scale+offset", "offset", "scale")
QUICK_BUDGET = Budget(gpu_warmup_ms=5, gpu_rep_ms=20, cpu_warmup=1, cpu_min_reps=3, cpu_min_seconds=0.02)


# ----------------------------------------------------------------------------------------------
# The implementations
# ----------------------------------------------------------------------------------------------

def _torch_path(z, head_index, scale, offset):
    """The op's plain torch forward, differentiated by autograd: what torch_compile compiles."""
    return head_affine_torch_forward(z, head_index, scale, offset, False)[0]


def _small_normal(shape, device, requires_grad):
    return (torch.randn(shape, device=device) * 1e-3).requires_grad_(requires_grad)


def build_transform(impl: str, num_heads: int, head_dim: int, k: int, params: str,
                    device: torch.device) -> tuple[Callable, list]:
    """(transform(z) -> z', the trained parameters) for one implementation. `params` says which of
    scale / offset are trained; eager_hook always applies both (frozen where not trained), as the paper's
    hook does."""
    heads = selected_heads(num_heads, k)
    train_scale, train_offset = "scale" in params, "offset" in params
    if impl == "eager_hook":
        scales = [_small_normal((head_dim,), device, train_scale and h in heads) for h in range(num_heads)]
        offsets = [_small_normal((head_dim,), device, train_offset and h in heads) for h in range(num_heads)]
        trained = [p for p in scales + offsets if p.requires_grad]
        return (lambda z: eager_hook_transform(z, scales, offsets)), trained
    head_index = torch.tensor(heads, device=device)
    scale = _small_normal((k, head_dim), device, True) if train_scale else None
    offset = _small_normal((k, head_dim), device, True) if train_offset else None
    trained = [p for p in (scale, offset) if p is not None]
    if impl in ("torch", "triton"):
        # The heads are valid by construction; the hooks of a patched model skip the check too (it syncs on CUDA).
        return (lambda z: head_affine(z, head_index, scale, offset, backend=impl, check_head_index=False)), trained
    if impl == "torch_compile":
        compiled = torch.compile(_torch_path, dynamic=False)
        return (lambda z: compiled(z, head_index, scale, offset)), trained
    raise ValueError(f"impl {impl!r} is not one of {IMPLS}")


def keeping_saved_buffers(impl: str):
    """The context to build and time `impl` in. torch_compile's backward must keep the tensors it saved:
    "backward" mode runs one graph's backward again and again (retain_graph=True), which a backward that
    donates its saved buffers refuses. Torch reads the setting both when compiling and when the backward
    runs, so the whole timing is inside. The other implementations keep theirs too: like for like."""
    if impl == "torch_compile":
        return torch._functorch.config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def mode_function(mode: str, transform: Callable, z: torch.Tensor, trained: list, grad: torch.Tensor) -> Callable:
    """The call that `mode` times."""
    inputs = [z, *trained]
    if mode == "forward":
        return lambda: transform(z)
    if mode == "backward":
        out = transform(z)
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(transform(z), inputs, grad)
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


# ----------------------------------------------------------------------------------------------
# Kernel benchmark
# ----------------------------------------------------------------------------------------------

def copy_gbps(z: torch.Tensor, budget: Budget) -> float:
    """GB/s of a clone of z (read and write: 2 * z.nbytes), timed as the op is (device time on GPU)."""
    z = z.detach()
    milliseconds = device_ms(lambda: z.clone(), z.device, budget)[0]
    return 2 * z.numel() * z.element_size() / milliseconds / 1e6


@dataclass(frozen=True)
class Case:
    """One layer shape, token count, K, dtype and set of trained parameters to time every impl and mode on."""

    shape: str
    num_heads: int
    head_dim: int
    tokens: int
    k: int
    dtype: str
    params: str

    @property
    def label(self) -> str:
        return f"{self.shape}/T{self.tokens}/K{self.k}/{self.dtype}/{self.params}"


def run_kernel_benchmark(cases: list[Case], impls: list[str], modes: list[str], device: torch.device,
                         budget: Budget, interpreted: bool) -> tuple[list[dict], float]:
    """Rows for every case x impl x mode, and the copy GB/s at the largest z.

    Args:
        cases: the (shape, tokens, K, dtype, trained parameters) combinations.
        impls: implementations, from IMPLS.
        modes: "forward", "backward", "full".
        device: where to run.
        budget: how long to time each call.
        interpreted: whether Triton runs in its CPU interpreter (marked on the triton rows).
    """
    rows, copies = [], {}
    total, done = len(cases) * len(impls) * len(modes), 0
    for case in cases:
        torch.manual_seed(0)
        dtype = DTYPES[case.dtype]
        width = case.num_heads * case.head_dim
        z = torch.randn(1, case.tokens, width, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(z.shape, device=device, dtype=dtype)
        if z.nbytes not in copies:
            copies[z.nbytes] = copy_gbps(z, budget)
        copy = copies[z.nbytes]
        for impl in impls:
            transform, trained = build_transform(impl, case.num_heads, case.head_dim, case.k, case.params, device)
            for mode in modes:
                done += 1
                progress(f"[{done}/{total}] {impl} {mode} {case.label}")
                with keeping_saved_buffers(impl):
                    fn = mode_function(mode, transform, z, trained, grad)
                    median, low, high, timing = device_ms(fn, device, budget)
                    host = time_ms(fn, device, budget)[0] if timing == "cuda_graph" else median
                    memory = peak_mb(fn, device)
                    del fn
                moved = op_bytes(mode, case.tokens, case.num_heads, case.head_dim, case.k, z.element_size(),
                                 "scale" in case.params, "offset" in case.params)
                gbps = moved / median / 1e6
                rows.append(dict(
                    impl=impl, mode=mode, shape=case.shape, ms=median, gbps=gbps, peak_mb=memory,
                    tokens=case.tokens, k=case.k, heads=case.num_heads, head_dim=case.head_dim,
                    dtype=case.dtype, params=case.params, bytes=moved, ms_p20=low, ms_p80=high, host_ms=host,
                    timing=timing,
                    copy_gbps=copy, pct_of_copy=100 * gbps / copy,
                    interpreted=impl == "triton" and interpreted))
                progress(f"    {median:.4g} ms ({timing}), host {host:.4g} ms, {gbps:.3g} GB/s, peak {memory:.3g} MB")
            del transform, trained
            if impl == "torch_compile":
                torch._dynamo.reset()
        del z, grad
        free_memory(device)
    largest = max(copies) if copies else None
    return rows, copies[largest] if largest is not None else None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap for large blocks, no trimming), so that a fresh buffer
    costs no page faults; True when applied. Under the default settings every buffer of 32 MB or more is a
    new mapping whose first touch faults page by page, which on some machines costs several times the op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


# ----------------------------------------------------------------------------------------------
# CPU target: overhead on top of o_proj's forward and backward
# ----------------------------------------------------------------------------------------------

TARGET_HEADS, TARGET_HEAD_DIM, TARGET_BATCH, TARGET_SEQ = 32, 128, 4, 512
TARGET_RATIOS = {"k2": 40.0, "all": 20.0}


def _target_variants(device) -> dict:
    """name -> (row fields, transform of z or None, trained parameters, o_proj output hook or None)."""
    from ..patch import folded_offset

    variants = {}
    for k, k_name in ((2, "k2"), (TARGET_HEADS, "all")):
        for impl in ("eager_hook", "torch"):
            transform, trained = build_transform(impl, TARGET_HEADS, TARGET_HEAD_DIM, k, "scale+offset", device)
            variants[f"{impl}/{k_name}"] = (dict(impl=impl, k=k, params="scale+offset"), transform, trained, None)
    transform, trained = build_transform("torch", TARGET_HEADS, TARGET_HEAD_DIM, 2, "offset", device)
    variants["torch/k2/offset"] = (dict(impl="torch", k=2, params="offset"), transform, trained, None)
    head_index = torch.tensor(selected_heads(TARGET_HEADS, 2), device=device)
    offset = _small_normal((2, TARGET_HEAD_DIM), device, True)

    def add_folded(o_proj, y):  # as patch_model's hook for offset-only layers
        return y.add_(folded_offset(o_proj, head_index, offset, TARGET_HEAD_DIM, y.dtype).to(y.dtype))

    variants["torch/k2/offset-folded"] = (dict(impl="torch", k=2, params="offset-folded"), None, [offset], add_folded)
    return variants


def run_cpu_target(rounds: int, device: torch.device) -> dict:
    """Rows (mode full_over_o_proj) and the summary of the CPU target (benchmarks/README.md, "CPU target").

    Args:
        rounds: timed rounds, after one warm-up round; each times every variant once, in a rotated order.
        device: the CPU.
    """
    torch.manual_seed(0)
    width = TARGET_HEADS * TARGET_HEAD_DIM
    o_proj = torch.nn.Linear(width, width, bias=False, device=device).requires_grad_(False)
    z = torch.randn(TARGET_BATCH, TARGET_SEQ, width, device=device, requires_grad=True)
    grad = torch.randn(z.shape, device=device)
    variants = _target_variants(device)

    def with_o_proj(transform, trained, hook):
        def step():
            y = o_proj(transform(z) if transform is not None else z)
            if hook is not None:
                y = hook(o_proj, y)
            return torch.autograd.grad(y, [z, *trained], grad)
        return step

    def alone(transform, trained):
        return lambda: torch.autograd.grad(transform(z), [z, *trained], grad)

    calls = {"o_proj": with_o_proj(None, [], None)}
    for name, (_, transform, trained, hook) in variants.items():
        calls[name] = with_o_proj(transform, trained, hook)
        if transform is not None:
            calls[f"{name}/isolated"] = alone(transform, trained)
    progress(f"cpu target: {len(calls)} calls per round, {rounds} rounds (+1 warm-up)")

    def report(round_index, times):
        progress(f"  round {round_index}/{rounds}: o_proj {times['o_proj'][-1]:.0f} ms, " + ", ".join(
            f"{name} +{times[name][-1] - times['o_proj'][-1]:.0f}" for name in variants))

    times = interleaved_ms(calls, rounds, device, after_round=report)

    base_peak = peak_mb(calls["o_proj"], device)
    overheads = {name: [t - b for t, b in zip(times[name], times["o_proj"])] for name in variants}
    rows = []
    for name, (fields, transform, _, _) in variants.items():
        overhead = statistics.median(overheads[name])
        moved = op_bytes("full", TARGET_BATCH * TARGET_SEQ, TARGET_HEADS, TARGET_HEAD_DIM, fields["k"], 4,
                         "scale" in fields["params"], True)
        isolated = statistics.median(times[f"{name}/isolated"]) if transform is not None else None
        rows.append(dict(
            mode="full_over_o_proj", shape="llama2-7b", ms=overhead,
            gbps=moved / overhead / 1e6 if overhead > 0 else None,
            peak_mb=peak_mb(calls[name], device) - base_peak,
            tokens=TARGET_BATCH * TARGET_SEQ, heads=TARGET_HEADS, head_dim=TARGET_HEAD_DIM, dtype="fp32",
            bytes=moved, total_ms=statistics.median(times[name]), o_proj_ms=statistics.median(times["o_proj"]),
            round_overhead_ms=overheads[name], isolated_ms=isolated,
            round_isolated_ms=times.get(f"{name}/isolated"), **fields))
    summary = dict(rounds=rounds, o_proj_ms=statistics.median(times["o_proj"]), round_o_proj_ms=times["o_proj"],
                   ratios={})
    for k_name, target in TARGET_RATIOS.items():
        eager, fast = f"eager_hook/{k_name}", f"torch/{k_name}"
        eager_ms, fast_ms = statistics.median(overheads[eager]), statistics.median(overheads[fast])
        ratio = eager_ms / fast_ms if fast_ms > 0 else None  # None: torch's overhead was lost in the noise
        isolated = statistics.median(times[f"{eager}/isolated"]) / statistics.median(times[f"{fast}/isolated"])
        per_round = [e / f if f > 0 else None for e, f in zip(overheads[eager], overheads[fast])]
        summary["ratios"][k_name] = dict(
            eager_overhead_ms=eager_ms, torch_overhead_ms=fast_ms, ratio=ratio, target=target,
            met=ratio is not None and ratio >= target,
            round_ratios=per_round, isolated_ratio=isolated)
    # Offset only (step 2 of the method) with 2 heads: the eager hook against the op and against the fold.
    eager_ms = statistics.median(overheads["eager_hook/k2"])
    for name in ("torch/k2/offset", "torch/k2/offset-folded"):
        fast_ms = statistics.median(overheads[name])
        summary["ratios"][name.replace("torch/", "").replace("/", "_")] = dict(
            eager_overhead_ms=eager_ms, torch_overhead_ms=fast_ms, ratio=eager_ms / fast_ms if fast_ms > 0 else None,
            target=None, met=None)
    return dict(rows=rows, summary=summary)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table; `*` marks Triton run by its CPU interpreter."""
    header = ("impl", "mode", "shape", "tokens", "K", "params", "dtype", "ms", "host ms", "GB/s", "%copy", "peak MB")
    cells = [(
        row["impl"] + ("*" if row.get("interpreted") else ""), row["mode"], row["shape"], str(row["tokens"]),
        str(row["k"]), row["params"], row["dtype"],
        format_number(row["ms"]) + ("+" if row.get("timing") == "events" else ""), format_number(row.get("host_ms")),
        format_number(row.get("gbps"), 3), format_number(row.get("pct_of_copy"), 3),
        format_number(row.get("peak_mb"), 3)) for row in rows]
    lines = aligned_table(header, cells, left_columns=(0, 1, 2, 5, 6))
    if any(row.get("timing") == "cuda_graph" for row in rows):
        lines.append("ms: device time (CUDA-graph replay); host ms: timed from Python, launch overhead included")
    if any(row.get("timing") == "events" for row in rows):
        lines.append("+ could not be captured in a CUDA graph: host timing")
    if any(row.get("interpreted") for row in rows):
        lines.append("* Triton interpreter on the CPU: correctness only, says nothing about GPU speed")
    return "\n".join(lines)


def format_target(summary: dict) -> str:
    lines = [f"o_proj alone (forward + backward): {summary['o_proj_ms']:.1f} ms (median of {summary['rounds']})"]
    for k_name, ratio in summary["ratios"].items():
        value = "n/a" if ratio["ratio"] is None else f"{ratio['ratio']:.1f}x"
        line = (f"{k_name}: eager overhead {ratio['eager_overhead_ms']:.1f} ms / torch overhead "
                f"{ratio['torch_overhead_ms']:.1f} ms = {value}")
        if ratio["target"] is not None:
            line += (f" (target >= {ratio['target']:.0f}x: {'met' if ratio['met'] else 'NOT met'}); "
                     f"transform alone {ratio['isolated_ratio']:.1f}x")
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _k(text: str):
    return "all" if text == "all" else int(text)


def _shape(text: str):
    """A known shape name, or HEADSxHEAD_DIM such as 32x128."""
    if text in SHAPES or text in QUICK_SHAPES:
        return text
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(SHAPES)} nor HEADSxHEAD_DIM")
    return text


def _flatten(lists):
    return [item for items in lists for item in items] if lists else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit bench",
        description="Microbenchmark of the LoFiT head transform (see lofit_fast/bench/kernels.py and "
                    "benchmarks/README.md).")
    parser.add_argument("--impl", nargs="+", type=comma_list(IMPLS),
                        help=f"{', '.join(IMPLS)} (default: all; triton on CPU only if named, with TRITON_INTERPRET=1)")
    parser.add_argument("--mode", nargs="+", type=comma_list(MODES), help="forward, backward, full (default: all)")
    parser.add_argument("--shape", nargs="+", type=comma_list(convert=_shape),
                        help=f"{', '.join(SHAPES)} or HEADSxHEAD_DIM (default: the three models)")
    parser.add_argument("--tokens", nargs="+", type=comma_list(convert=parse_tokens), help="e.g. 4k,16k (the default)")
    parser.add_argument("--k", nargs="+", type=comma_list(convert=_k), help="selected heads per layer: all, or a count "
                        "(default: all,2)")
    parser.add_argument("--params", nargs="+", type=comma_list(PARAMS),
                        help="trained parameters: scale+offset (default), offset, scale")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="activations (default: bf16 on GPU, fp32 on CPU)")
    add_run_arguments(parser)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: glibc reuses freed memory instead of mapping fresh pages for every large buffer")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timing: a smoke run")
    parser.add_argument("--cpu-target", action="store_true",
                        help="fp32 overhead on top of o_proj, eager_hook vs torch (the CPU acceptance numbers)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --cpu-target (default: %(default)s)")
    return parser


def _cases(args, device) -> list[Case]:
    shape_names = _flatten(args.shape) or list(QUICK_SHAPES if args.quick else SHAPES)
    tokens = _flatten(args.tokens) or list(QUICK_TOKENS if args.quick else TOKENS)
    ks = _flatten(args.k) or list(KS)
    params = _flatten(args.params) or ["scale+offset"]
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cases = []
    for name in shape_names:
        heads, head_dim = SHAPES.get(name) or QUICK_SHAPES.get(name) or tuple(int(x) for x in name.split("x"))
        for count in tokens:
            for k in ks:
                selected = heads if k == "all" else k
                if not 1 <= selected <= heads:
                    raise ValueError(f"--k {k}: {name} has {heads} heads")
                for param in params:
                    cases.append(Case(name, heads, head_dim, count, selected, dtype, param))
    return cases


def _impls(args, device) -> list[str]:
    named = _flatten(args.impl)
    if device.type == "cuda":
        return named or list(IMPLS)
    if named is None:
        return [impl for impl in IMPLS if impl != "triton"]
    if "triton" in named and not triton_interpreter_enabled():
        raise ValueError("--impl triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter; slow, "
                         "correctness only)")
    return named


def main(argv=None) -> int:
    """Run the kernel benchmark, print its table and write its JSON; 0 on success.

    Args:
        argv: the command line without the program name (default: sys.argv[1:]); `--help` lists the options:
            --impl, --mode, --shape, --tokens, --k, --params, --dtype pick the rows; --device, --threads,
            --output; --quick (tiny shapes, short timing); --cpu-target [--rounds N] (the CPU acceptance run);
            --keep-freed-memory (CPU: glibc reuses freed memory).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc's mallopt")
    result = dict(**run_header(device),
                  # CPU times depend on the allocator (see keep_freed_memory).
                  keep_freed_memory=args.keep_freed_memory,
                  allocator_env={key: value for key, value in os.environ.items()
                                 if key.startswith("MALLOC_") or key in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")})
    suffix = "-keep-freed-memory" if args.keep_freed_memory else ""
    if args.cpu_target:
        if device.type != "cpu":
            parser.error("--cpu-target measures the CPU; run it with --device cpu")
        target = run_cpu_target(args.rounds, device)
        z_bytes = TARGET_BATCH * TARGET_SEQ * TARGET_HEADS * TARGET_HEAD_DIM * 4
        result.update(copy_gbps=copy_gbps(torch.empty(z_bytes // 4, device=device).normal_(), Budget()),
                      rows=target["rows"], cpu_target=target["summary"])
        path = output_path(args.output, result["device"], result["date"], "-cpu-target" + suffix)
        print(format_table(result["rows"]))
        print(format_target(target["summary"]))
    else:
        try:
            cases, impls = _cases(args, device), _impls(args, device)
        except ValueError as error:
            parser.error(str(error))
        modes = _flatten(args.mode) or list(MODES)
        budget = QUICK_BUDGET if args.quick else Budget()
        rows, copy = run_kernel_benchmark(cases, impls, modes, device, budget, triton_interpreter_enabled())
        result.update(copy_gbps=copy, quick=args.quick, rows=rows)
        path = output_path(args.output, result["device"], result["date"], suffix)
        print(format_table(rows))
        if copy is not None:
            print(f"copy (clone of the largest z): {copy:.3g} GB/s")
    write_results(result, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
