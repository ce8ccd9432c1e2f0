"""Kernel microbenchmark of the LoFiT head transform: `lofit bench` and `benchmarks/bench_kernels.py`.

    lofit bench                                         # every impl, mode, shape, token count and K
    lofit bench --impl torch,triton --mode full --shape llama2-7b --tokens 4k --k 2
    lofit bench --quick                                 # tiny shapes, a smoke run (CI)
    lofit bench --cpu-target                            # the issue's CPU acceptance numbers (below)

One row per (implementation, mode, shape, tokens, K): a table on stdout, progress on stderr, and JSON in
`benchmarks/results/<device>-<date>.json` (`--output` takes a file or a folder):

    {"device", "date", "copy_gbps", "rows": [{"impl", "mode", "shape", "ms", "gbps", "peak_mb", ...}], ...}

Extra row keys: tokens, k, heads, head_dim, dtype, params, bytes, ms_p20 / ms_p80 (the spread), host_ms, timing,
copy_gbps (a clone of this z), pct_of_copy, interpreted (Triton run by its CPU interpreter).

Implementations (all compute z'_h = (1 + A_h) z_h + v_h on the selected heads, fp32 parameters):
- eager_hook: the paper's code (LlamaAttention.forward in the LoFiT repository: for every head i,
  `out[..., i*D:(i+1)*D] = torch.mul(A[i] + 1, out[..., i*D:(i+1)*D].clone()) + v[i]`). Every head of the
  layer has its own (A, v), frozen on unselected heads, and the loop runs over *all* heads. There it writes
  into attention's fresh `.contiguous()` output; here z is a leaf, so the loop runs on one clone of it (out
  of place, as the op is; about 2% of its time).
- torch: `lofit_fast.ops.head_affine(..., backend="torch")`, the registered op's vectorized path.
- torch_compile: `torch.compile` of the plain torch functions under that op (not of the op, which
  would stay one opaque node): what Inductor makes of the same math, forward and backward.
- triton: `head_affine(..., backend="triton")`. On CPU only with TRITON_INTERPRET=1 and only when asked
  for by `--impl` (the interpreter is slow and says nothing about GPU speed); its rows are marked
  interpreted.

Modes, as in training (z and the trained parameters require grad):
- forward: the transform, autograd graph included.
- backward: `torch.autograd.grad` of one saved forward (retain_graph) w.r.t. z and the trained parameters.
- full: forward and backward.

Bytes (`op_bytes`), the traffic of the fused design, used for every implementation's GB/s. With N tokens,
H heads of size D, C = H * D, K selected heads, e bytes per activation element, P trained parameter
tensors (1 or 2) of K * D fp32 numbers each:
- forward: read z, write z' (2 N C e); with a trained scale and K < H, also write the selected heads' slice
  of z for backward (N K D e); read the parameters (P K D 4).
- backward with a scale: read g, write grad_z (2 N C e), read the saved selected slice of z (N K D e; z
  itself when K = H); read the scale, write the P gradients ((1 + P) K D 4).
- backward with an offset only: grad_z is g itself, so read only the selected heads of g (N K D e); write
  the gradient (K D 4).
- full = forward + backward.
`copy_gbps` is a clone of z (2 N C e bytes), the device's copy speed at that size, for comparison.

CPU caveats: under glibc's default settings every fresh buffer of 32 MB or more is a new mapping whose pages
fault in on first touch; on some machines (VMs) that costs several times the op itself and depends on the heap's
history. `--keep-freed-memory` makes glibc reuse freed memory (mallopt), so the times show the work rather than
the page faults; the JSON records it. On a shared machine `--threads 1` avoids stalls at OpenMP barriers.

Timing, GPU: `ms` is the device time of the call, from `triton.testing.do_bench_cudagraph` (the call captured
many times in a CUDA graph and replayed, so no host work is counted; median and 20/80% quantiles; the data stays
in L2 between calls where it fits), timing "cuda_graph"; `host_ms` is `triton.testing.do_bench` of the same call
from Python (CUDA events around each call: at 4k tokens mostly launch and dispatch overhead, not bandwidth). A
call that cannot be captured (timing "events") reports the host number in both. GB/s and %copy use `ms`. CPU:
a warm-up then the median of repeated calls (time.perf_counter), timing "wall", `host_ms` the same number.
Peak memory: on GPU torch.cuda.max_memory_allocated during one call minus what was allocated before it (inputs
excluded, outputs and saved tensors included); on CPU the profiler's allocation events (torch.profiler,
profile_memory), summed in time order at op granularity: the peak of bytes newly allocated during the call.

CPU target (`--cpu-target`, fp32): one Llama-2-7B layer, 32 heads x 128, 4 x 512 tokens, forward and backward
of `o_proj(z)` (nn.Linear 4096 -> 4096, frozen weight, z requires grad as in a model) with the transform
(scale + offset) applied by eager_hook or torch, and o_proj alone. Each round times every variant once, in
a rotated order; overhead = time(with transform) - time(o_proj alone) of the same round, and the reported
overhead is the median over rounds. Target: eager overhead / torch overhead >= 40 with 2 heads, >= 20 with
all heads. Extra rows: offset only through the op, and offset only folded into o_proj's output (what
`patch_model` does for offset-only layers, `lofit_fast.patch.folded_offset`). Each row also has the
transform alone (no o_proj) timed in the same round, `isolated_ms`, a less noisy cross-check. Rows have mode
"full_over_o_proj": ms is the median overhead, gbps the full-mode bytes over it, peak_mb the peak above o_proj
alone's (it can be negative); per-round numbers are kept (round_overhead_ms). The summary, with the ratios and
whether the targets are met, is under the key "cpu_target". The file is `<device>-<date>-cpu-target.json`
(`-keep-freed-memory` is added to every file name when that option is on).
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .io import atomic_write_text

from .ops import head_affine, head_affine_torch_forward, triton_interpreter_enabled

SHAPES = {"llama2-7b": (32, 128), "llama2-13b": (40, 128), "gemma-7b": (16, 256)}
QUICK_SHAPES = {"tiny": (8, 32)}
TOKENS = (4096, 16384)
QUICK_TOKENS = (256,)
KS = ("all", 2)
IMPLS = ("eager_hook", "torch", "torch_compile", "triton")
MODES = ("forward", "backward", "full")
PARAMS = ("scale+offset", "offset", "scale")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_OUTPUT = os.path.join("benchmarks", "results")
PARAM_BYTES = 4  # LoFiT parameters are fp32 master weights


# ----------------------------------------------------------------------------------------------
# Bytes the op must move
# ----------------------------------------------------------------------------------------------

def op_bytes(mode: str, tokens: int, num_heads: int, head_dim: int, k: int, element_size: int,
             scale: bool = True, offset: bool = True) -> int:
    """Bytes the fused op moves in `mode` (see the module doc for the definition)."""
    if mode == "full":
        return sum(op_bytes(m, tokens, num_heads, head_dim, k, element_size, scale, offset)
                   for m in ("forward", "backward"))
    whole = tokens * num_heads * head_dim * element_size
    selected = tokens * k * head_dim * element_size
    param = k * head_dim * PARAM_BYTES
    trained = int(scale) + int(offset)
    if mode == "forward":
        saved = selected if scale and k < num_heads else 0
        return 2 * whole + saved + trained * param
    if mode == "backward":
        if scale:
            return 2 * whole + selected + (1 + trained) * param
        return selected + param
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


# ----------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's answer elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def file_safe(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------

@dataclass
class Budget:
    """How long to time each call: do_bench's warmup / rep (ms) on GPU; warm-up calls, at least
    `min_reps` calls and `min_seconds` on CPU."""
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    cpu_warmup: int = 2
    cpu_min_reps: int = 5
    cpu_min_seconds: float = 1.0
    cpu_max_reps: int = 200


QUICK_BUDGET = Budget(gpu_warmup_ms=5, gpu_rep_ms=20, cpu_warmup=1, cpu_min_reps=3, cpu_min_seconds=0.02)


def time_ms(fn: Callable, device: torch.device, budget: Budget) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) of fn's time in milliseconds, timed from the host (see the module doc)."""
    if device.type == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms,
                                                    quantiles=[0.5, 0.2, 0.8])
        return median, low, high
    for _ in range(budget.cpu_warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < budget.cpu_min_reps or (time.perf_counter() - started < budget.cpu_min_seconds
                                                and len(times) < budget.cpu_max_reps):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return _quantiles(times)


def device_ms(fn: Callable, device: torch.device, budget: Budget) -> tuple[float, float, float, str]:
    """(median, 20% quantile, 80% quantile, timing): on GPU the device time of fn from CUDA-graph replays
    (timing "cuda_graph"), or the host timing if fn cannot be captured ("events"); on CPU the wall time ("wall")."""
    if device.type != "cuda":
        return (*time_ms(fn, device, budget), "wall")
    import triton.testing

    try:
        median, low, high = triton.testing.do_bench_cudagraph(fn, rep=budget.gpu_rep_ms, quantiles=[0.5, 0.2, 0.8])
        return median, low, high, "cuda_graph"
    except RuntimeError as error:  # a call that allocates in a way capture refuses, or syncs
        progress(f"    not capturable in a CUDA graph ({str(error).splitlines()[0][:120]}); timing from the host")
        torch.cuda.synchronize(device)
        return (*time_ms(fn, device, budget), "events")


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), deciles[1], deciles[7]


def peak_mb(fn: Callable, device: torch.device) -> float:
    """Peak MB allocated during one call of fn beyond what was allocated before it (see the module doc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak / 2**20
    with _quiet_profiler() as profiler:
        result = fn()
    del result
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def _quiet_profiler():
    """torch.profiler with memory events; Kineto's start/stop lines on stderr are silenced."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_to_devnull():
        profiler.__enter__()
    try:
        yield profiler
    finally:
        with _stderr_to_devnull():
            profiler.__exit__(None, None, None)


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def copy_gbps(z: torch.Tensor, budget: Budget) -> float:
    """GB/s of a clone of z (read and write: 2 * z.nbytes), timed as the op is (device time on GPU)."""
    z = z.detach()
    milliseconds = device_ms(lambda: z.clone(), z.device, budget)[0]
    return 2 * z.numel() * z.element_size() / milliseconds / 1e6


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
# The implementations
# ----------------------------------------------------------------------------------------------

def eager_hook_transform(z: torch.Tensor, scales: list, offsets: list) -> torch.Tensor:
    """The paper's per-head hook: one (scale, offset) pair per head, every head of the layer, one head at a
    time: clone the slice, multiply, add, write it back. Runs on a clone of z (z is a leaf here)."""
    head_dim = scales[0].shape[-1]
    out = z.clone()
    for head, (scale, offset) in enumerate(zip(scales, offsets)):
        columns = slice(head * head_dim, (head + 1) * head_dim)
        out[..., columns] = out[..., columns].clone() * (1 + scale) + offset
    return out


def _torch_path(z, head_index, scale, offset):
    """The op's plain torch forward, differentiated by autograd: what torch_compile compiles."""
    return head_affine_torch_forward(z, head_index, scale, offset, False)[0]


def selected_heads(num_heads: int, k: int) -> list[int]:
    """K heads spread over the layer: all heads in order for K = H, e.g. [8, 24] for K = 2 of 32."""
    return [(2 * slot + 1) * num_heads // (2 * k) for slot in range(k)]


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
        return (lambda z: head_affine(z, head_index, scale, offset, backend=impl)), trained
    if impl == "torch_compile":
        compiled = torch.compile(_torch_path, dynamic=False)
        return (lambda z: compiled(z, head_index, scale, offset)), trained
    raise ValueError(f"impl {impl!r} is not one of {IMPLS}")


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

@dataclass(frozen=True)
class Case:
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
    """Rows for every case x impl x mode, and the copy GB/s at the largest z."""
    rows, copies = [], {}
    total, done = len(cases) * len(impls) * len(modes), 0
    for case in cases:
        torch.manual_seed(0)
        dtype = DTYPES[case.dtype]
        width = case.num_heads * case.head_dim
        z = torch.randn(1, case.tokens, width, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(z.shape, device=device, dtype=dtype)
        copy = copies.setdefault(z.numel() * z.element_size(), copy_gbps(z, budget))
        for impl in impls:
            transform, trained = build_transform(impl, case.num_heads, case.head_dim, case.k, case.params, device)
            for mode in modes:
                done += 1
                progress(f"[{done}/{total}] {impl} {mode} {case.label}")
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


def free_memory(device):
    """Drop garbage (and, on CUDA, the allocator's cached blocks) between measurements."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress(message: str):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# CPU target: overhead on top of o_proj's forward and backward
# ----------------------------------------------------------------------------------------------

TARGET_HEADS, TARGET_HEAD_DIM, TARGET_BATCH, TARGET_SEQ = 32, 128, 4, 512
TARGET_RATIOS = {"k2": 40.0, "all": 20.0}


def _target_variants(device) -> dict:
    """name -> (row fields, transform of z or None, trained parameters, o_proj output hook or None)."""
    from .patch import folded_offset

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
    """Rows (mode full_over_o_proj) and the summary of the CPU target; see the module doc."""
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
    names = list(calls)
    progress(f"cpu target: {len(names)} calls per round, {rounds} rounds (+1 warm-up)")
    times = {name: [] for name in names}
    for round_index in range(rounds + 1):
        shift = round_index % len(names)  # rotate the order so that no variant always runs first
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            calls[name]()
            elapsed = (time.perf_counter() - begin) * 1e3
            if round_index > 0:
                times[name].append(elapsed)
        if round_index > 0:
            progress(f"  round {round_index}/{rounds}: o_proj {times['o_proj'][-1]:.0f} ms, " + ", ".join(
                f"{name} +{times[name][-1] - times['o_proj'][-1]:.0f}" for name in variants))

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
    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}g}"

    header = ("impl", "mode", "shape", "tokens", "K", "params", "dtype", "ms", "host ms", "GB/s", "%copy", "peak MB")
    table = [header] + [(
        row["impl"] + ("*" if row.get("interpreted") else ""), row["mode"], row["shape"], str(row["tokens"]),
        str(row["k"]), row["params"], row["dtype"], number(row["ms"]) + ("+" if row.get("timing") == "events" else ""),
        number(row.get("host_ms")), number(row.get("gbps"), 3),
        number(row.get("pct_of_copy"), 3), number(row.get("peak_mb"), 3)) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    text = (0, 1, 2, 5, 6)  # left-aligned; numbers are right-aligned
    lines = ["  ".join(cell.ljust(width) if column in text else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))) for line in table]
    lines.insert(1, "-" * len(lines[0]))
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


def output_path(output: str, device: str, date: str, suffix: str = "") -> str:
    """`output` itself when it names a .json file, else `<output>/<device>-<date><suffix>.json`."""
    if output.endswith(".json"):
        return output
    return os.path.join(output, f"{file_safe(device)}-{date}{suffix}.json")


def write_json(result: dict, path: str) -> None:
    """Write atomically: an interrupted run never leaves a half-written results file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def comma_list(valid=None, convert=str):
    """argparse type: a comma-separated list, each item converted and checked against `valid`."""
    def parse(text: str):
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
        for item in items:
            if valid is not None and item not in valid:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(map(str, valid))}")
        return items
    return parse


def _tokens(text: str) -> int:
    """'4096', '4k' or '16K' -> tokens."""
    text = text.lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


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
        prog="lofit bench", description="Microbenchmark of the LoFiT head transform (see lofit_fast/benchmark.py).")
    parser.add_argument("--impl", nargs="+", type=comma_list(IMPLS),
                        help=f"{', '.join(IMPLS)} (default: all; triton on CPU only if named, with TRITON_INTERPRET=1)")
    parser.add_argument("--mode", nargs="+", type=comma_list(MODES), help="forward, backward, full (default: all)")
    parser.add_argument("--shape", nargs="+", type=comma_list(convert=_shape),
                        help=f"{', '.join(SHAPES)} or HEADSxHEAD_DIM (default: the three models)")
    parser.add_argument("--tokens", nargs="+", type=comma_list(convert=_tokens), help="e.g. 4k,16k (the default)")
    parser.add_argument("--k", nargs="+", type=comma_list(convert=_k), help="selected heads per layer: all, or a count "
                        "(default: all,2)")
    parser.add_argument("--params", nargs="+", type=comma_list(PARAMS),
                        help="trained parameters: scale+offset (default), offset, scale")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="activations (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="a .json file or a folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc's mallopt")
    name = device_name(device)
    date = datetime.date.today().isoformat()
    result = dict(device=name, device_type=device.type, date=date, torch=torch.__version__,
                  threads=torch.get_num_threads() if device.type == "cpu" else None,
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
        path = output_path(args.output, name, date, "-cpu-target" + suffix)
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
        path = output_path(args.output, name, date, suffix)
        print(format_table(rows))
        if copy is not None:
            print(f"copy (clone of the largest z): {copy:.3g} GB/s")
    write_json(result, path)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
