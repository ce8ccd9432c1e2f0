"""What every benchmark in lofit_fast.bench shares; each imports from here and from no other benchmark.

- The op under test: layer shapes, the bytes the fused op must move (`op_bytes`), which heads a run selects
  (`selected_heads`, `random_heads`), and the paper's per-head hook (`eager_hook_transform`), the baseline.
- Devices: `pick_device`, `device_name` (GPU name or CPU model), `synchronize`, `free_memory`.
- Timing: `time_ms` (GPU: `triton.testing.do_bench`; CPU: a warm-up, then the median of repeated calls),
  `device_ms` (GPU: `do_bench_cudagraph`, device time only), `wall_ms` / `interleaved_ms` for long calls.
- Peak memory: `peak_mb` (CUDA allocator statistics, or the CPU profiler's allocation events), `cuda_peak_mb`.
- Output: `progress` (stderr), `aligned_table`, `run_header`, `output_path`, `write_results` (atomic JSON).
- Command line: `comma_list`, `parse_tokens`, `add_run_arguments` (--device, --threads, --output).

The methodology behind these numbers is in benchmarks/README.md.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..io import atomic_write_text

# ----------------------------------------------------------------------------------------------
# The op under test
# ----------------------------------------------------------------------------------------------

# (attention heads, head_dim) of one layer of each model.
SHAPES = {"llama2-7b": (32, 128), "llama2-13b": (40, 128), "gemma-7b": (16, 256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full")  # what op_bytes counts, and what the kernel benchmark times
PARAM_BYTES = 4  # LoFiT parameters are fp32 master weights


def op_bytes(mode: str, tokens: int, num_heads: int, head_dim: int, k: int, element_size: int,
             scale: bool = True, offset: bool = True) -> int:
    """Bytes the fused op moves in `mode`: the traffic of its design, which every implementation's GB/s is
    measured against (the definition, term by term: benchmarks/README.md, "Bytes").

    Args:
        mode: "forward", "backward" or "full" (both).
        tokens: N, the tokens of the batch.
        num_heads: H, attention heads of the layer.
        head_dim: D, the size of a head.
        k: K, the selected heads.
        element_size: bytes of an activation element.
        scale: whether the scale is trained.
        offset: whether the offset is trained.
    """
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


def selected_heads(num_heads: int, k: int) -> list[int]:
    """K heads spread over the layer: all heads in order for K = H, e.g. [8, 24] for K = 2 of 32."""
    return [(2 * slot + 1) * num_heads // (2 * k) for slot in range(k)]


def random_heads(num_layers: int, num_heads: int, k: int, seed: int = 0) -> list[tuple[int, int]]:
    """K distinct (layer, head) pairs drawn at random (seeded) from the whole model, sorted."""
    pairs = [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    return sorted(random.Random(seed).sample(pairs, k))


def eager_hook_transform(z: torch.Tensor, scales: list, offsets: list) -> torch.Tensor:
    """The paper's per-head hook: one (scale, offset) pair per head, every head of the layer, one head at a
    time: clone the slice, multiply, add, write it back. Runs on a clone of z (z is a leaf here)."""
    head_dim = scales[0].shape[-1]
    out = z.clone()
    for head, (scale, offset) in enumerate(zip(scales, offsets)):
        columns = slice(head * head_dim, (head + 1) * head_dim)
        out[..., columns] = out[..., columns].clone() * (1 + scale) + offset
    return out


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------

def pick_device(name: Optional[str]) -> torch.device:
    """`name` (cuda, cpu, cuda:1, ...), or cuda when available, else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches return before the kernels finish); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop garbage (and, on CUDA, the allocator's cached blocks) between measurements."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

@dataclass
class Budget:
    """How long to time each call: do_bench's warmup / rep (ms) on GPU; warm-up calls, at least
    `cpu_min_reps` calls and `cpu_min_seconds` (at most `cpu_max_reps` calls) on CPU."""
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    cpu_warmup: int = 2
    cpu_min_reps: int = 5
    cpu_min_seconds: float = 1.0
    cpu_max_reps: int = 200


def time_ms(fn: Callable, device: torch.device, budget: Budget) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) of fn's time in milliseconds, timed from the host: on GPU
    `triton.testing.do_bench` (CUDA events around each call), on CPU a warm-up, then repeated calls."""
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
        times.append(wall_ms(fn, device))
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


def wall_ms(fn: Callable, device: torch.device) -> float:
    """Wall time of one call of fn in milliseconds, synchronized before and after on CUDA, so that the call's
    own kernels are counted and no earlier ones are."""
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def rotation(names: list, round_index: int) -> list:
    """`names` rotated by `round_index`, so that over the rounds no name always runs first."""
    if not names:
        return []
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def interleaved_ms(calls: dict[str, Callable], rounds: int, device: torch.device,
                   after_round: Optional[Callable[[int, dict], None]] = None) -> dict[str, list[float]]:
    """Each call's wall time (ms) in each of `rounds` rounds, after one untimed warm-up round. A round runs every
    call once, in an order that rotates from round to round, so that a slowdown of the machine meanwhile falls on
    all calls alike; `after_round(round, times so far)` follows each timed round (for progress)."""
    names = list(calls)
    times = {name: [] for name in names}
    for round_index in range(rounds + 1):
        for name in rotation(names, round_index):
            elapsed = wall_ms(calls[name], device)
            if round_index > 0:
                times[name].append(elapsed)
        if round_index > 0 and after_round is not None:
            after_round(round_index, times)
    return times


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

def peak_mb(fn: Callable, device: torch.device) -> float:
    """Peak MB allocated during one call of fn beyond what was allocated before it (inputs excluded, outputs
    and saved tensors included): on CUDA from the allocator's statistics; on the CPU from the profiler's
    allocation events, summed in time order at op granularity."""
    if device.type == "cuda":
        return cuda_peak_mb(fn, device)[1]
    gc.collect()
    with _quiet_profiler() as profiler:
        result = fn()
    del result
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def cuda_peak_mb(fn: Callable, device: torch.device) -> tuple[float, float]:
    """(peak MB allocated on the GPU during one call of fn, that peak minus what was allocated before it)."""
    free_memory(device)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak / 2**20, (peak - before) / 2**20


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


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


def format_number(value: Optional[float], digits: int = 4) -> str:
    """`digits` significant digits, "-" for a figure that does not apply."""
    return "-" if value is None else f"{value:.{digits}g}"


def aligned_table(header: tuple, rows: list, left_columns: tuple = ()) -> list[str]:
    """Lines of a text table: the header, a rule, a line per row of cells (strings); the columns in
    `left_columns` are left-aligned, the others (numbers) right-aligned."""
    table = [header] + list(rows)
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column in left_columns else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))) for line in table]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def run_header(device: torch.device) -> dict:
    """The keys every results file starts with: device (its name), device_type, date, torch, threads (CPU)."""
    return dict(device=device_name(device), device_type=device.type, date=datetime.date.today().isoformat(),
                torch=torch.__version__, threads=torch.get_num_threads() if device.type == "cpu" else None)


def output_path(output: str, device: str, date: str, suffix: str = "", prefix: str = "") -> str:
    """`output` itself when it names a .json file, else `<output>/<prefix><device>-<date><suffix>.json`."""
    if output.endswith(".json"):
        return output
    return os.path.join(output, f"{prefix}{file_safe(device)}-{date}{suffix}.json")


def write_json(result: dict, path: str) -> None:
    """Write atomically: an interrupted run never leaves a half-written results file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def write_results(result: dict, path: str) -> None:
    """Write the results file and say where it is."""
    write_json(result, path)
    print(f"results: {path}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

DEFAULT_OUTPUT = os.path.join("benchmarks", "results")


def comma_list(valid=None, convert=str):
    """argparse type: a comma-separated list, each item converted and checked against `valid`."""
    def parse(text: str):
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
        for item in items:
            if valid is not None and item not in valid:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(map(str, valid))}")
        return items
    return parse


def parse_tokens(text: str) -> int:
    """'4096', '4k' or '16K' -> tokens."""
    text = text.lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and --output, as every benchmark that runs on a device takes them."""
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="a .json file or a folder (default: %(default)s)")
