"""Static report of the head_affine kernels: compiled for a GPU target on any machine, read from the machine code,
and a bandwidth prediction from that. `lofit bench --static` and `benchmarks/bench_static.py`.

    lofit bench --static                          # sm_90, Llama-2 7B and 13B layers, 4k and 16k tokens, bf16
    lofit bench --static --target 80,90 --case step1-backward --shape llama2-7b --tokens 4k

Each case (a training-time launch of one kernel on one layer shape) goes through the real launchers with
`lofit_fast.kernels.cross_compile.CrossCompiler` (nothing runs; no GPU needed), and every config that the
autotuner's pruning keeps is compiled to a cubin, read (registers, spills, access widths, reductions, round
trips) and fed to a bandwidth model: a PREDICTION, not a measurement. A table on stdout and
`benchmarks/results/static-sm<arch>-<date>.json` per target; the row keys and the model: benchmarks/README.md.
"""

import argparse
import datetime
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..ops import triton_interpreter_enabled
from .common import (
    DEFAULT_OUTPUT,
    DTYPES,
    SHAPES,
    aligned_table,
    comma_list,
    op_bytes,
    output_path,
    parse_tokens,
    progress,
    selected_heads,
    write_results,
)

# The card each architecture is predicted for, with its peak DRAM bandwidth from the vendor's data sheet (GB/s).
CARDS = {80: ("A100 SXM4 80GB", 2039.0), 86: ("RTX A6000", 768.0), 89: ("RTX 4090", 1008.0),
         90: ("H100 SXM5", 3350.0)}
LATENCY_NS = 700.0  # DRAM latency under load assumed for every card
REDUCTION_NS = 250.0  # a reduction across warps: shuffles, a shared-memory round trip, two barriers
CONVERSION_NS = 100.0  # a layout conversion: a shared-memory round trip behind a barrier
STREAM_POINTERS = ("z_ptr", "out_ptr", "z_selected_ptr", "grad_out_ptr", "saved_ptr", "grad_z_ptr")


@dataclass(frozen=True)
class Case:
    """A launch of one kernel as training makes it."""

    name: str
    kernel: str
    k: Optional[int]  # None: every head
    scale: bool
    offset: bool
    save_selected: bool = False
    need_grad_z: bool = False
    need_grad_scale: bool = False
    need_grad_offset: bool = False
    what: str = ""

    def selected(self, num_heads: int) -> int:
        """K: the heads this launch transforms."""
        return num_heads if self.k is None else self.k

    def grid_columns(self, num_heads: int) -> int:
        """Axis 1 of the grid and of the backward's partial sums: every head, or only the selected ones when the
        backward writes no grad_z."""
        return num_heads if self.kernel == "forward" or self.need_grad_z else self.selected(num_heads)


CASES = (
    Case("step1-forward", "forward", None, True, False, what="step 1: scales on every head"),
    Case("step2s-forward", "forward", 2, True, True, save_selected=True,
         what="scales and offsets on 2 heads, the slice saved"),
    Case("offset-forward", "forward", 2, False, True, what="offsets on 2 heads through the op"),
    Case("step1-backward", "backward", None, True, False, need_grad_z=True, need_grad_scale=True,
         what="step 1: grad_z and grad_A, every head"),
    Case("step2s-backward", "backward", 2, True, True, need_grad_z=True, need_grad_scale=True, need_grad_offset=True,
         what="scales and offsets on 2 heads: grad_z, grad_A, grad_v"),
    Case("lowest-backward", "backward", 2, True, True, need_grad_scale=True, need_grad_offset=True,
         what="the lowest patched layer: grad_A and grad_v, no grad_z"),
    Case("offset-backward", "backward", 2, False, True, need_grad_offset=True,
         what="offsets only: grad_v from the selected columns of g"),
)
CASE_NAMES = tuple(case.name for case in CASES)


def case_inputs(case: Case, num_heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> tuple:
    """Meta tensors of a case, (args of the launcher) for kernels.forward / kernels.backward."""
    meta = dict(device="meta")
    k = case.selected(num_heads)
    head_index = torch.tensor(selected_heads(num_heads, k), device=meta["device"])
    z = torch.empty(1, tokens, num_heads * head_dim, dtype=dtype, **meta)
    scale = torch.empty(k, head_dim, **meta) if case.scale else None
    offset = torch.empty(k, head_dim, **meta) if case.offset else None
    if case.kernel == "forward":
        return z, head_index, scale, offset, case.save_selected
    saved = None
    if case.need_grad_scale:
        saved = z if k == num_heads else torch.empty(tokens, k, head_dim, dtype=dtype, **meta)
    return z, saved, head_index, scale, head_dim, case.need_grad_z, case.need_grad_scale, case.need_grad_offset


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def resident_blocks(registers: int, warps: int, shared_bytes: int, limits: dict) -> tuple[int, int, str]:
    """(resident programs per multiprocessor, of which the registers allow, the limiting resource)."""
    registers_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    by_registers = (limits["registers"] // registers_per_warp) // warps
    candidates = {"registers": by_registers, "warps": limits["max_warps"] // warps, "blocks": limits["max_blocks"]}
    if shared_bytes:
        candidates["shared memory"] = limits["shared_kib"] * 1024 // (shared_bytes + 1024)  # 1 KB reserved a block
    limit = min(candidates, key=candidates.get)
    return candidates[limit], by_registers, limit


def traffic(case: Case, num_heads: int, head_dim: int, tokens: int, element: int, partial_rows: int) -> tuple:
    """(bytes one call moves, the fused design's minimum). Backward adds the fp32 partial sums, a row per chunk and
    selected head: written by the kernel and read by the host's sum, and when the buffer has a column per head but
    only some are selected, also gathered first (read and written once more)."""
    k = case.selected(num_heads)
    minimum = op_bytes(case.kernel, tokens, num_heads, head_dim, k, element, scale=case.scale, offset=case.offset)
    if case.kernel == "forward":
        return minimum, minimum
    gradients = int(case.need_grad_scale) + int(case.need_grad_offset)
    if not case.need_grad_z:
        # No grad_z (offsets only, or the lowest patched layer): the selected heads' columns of g (and of the saved
        # z), the scale, and the gradients; op_bytes counts the grad_z pass of the layers above.
        slices = tokens * k * head_dim * element * (1 + int(case.need_grad_scale))
        minimum = slices + (int(case.scale) + gradients) * k * head_dim * 4
    passes = 4 if case.grid_columns(num_heads) > k else 2
    return minimum + partial_rows * k * head_dim * 4 * passes * gradients, minimum


def loaded_per_iteration(case: Case, num_heads: int, head_dim: int, block_t: int, element: int) -> float:
    """Stream bytes one program loads per loop iteration (its one tile in forward), averaged over the programs."""
    tile = block_t * head_dim * element
    if case.kernel == "forward":
        return tile
    k = case.selected(num_heads)
    selected = tile * (2 if case.need_grad_scale else 1)  # g, and the saved z for grad_A
    if not case.need_grad_z:
        return selected  # the grid walks the selected heads only
    return (k * selected + (num_heads - k) * tile) / num_heads


def predicted_fraction(bytes_moved: int, minimum: int, read_share: float, loaded_per_iteration: float,
                       iterations: int, iteration_ns: float, program_overhead_ns: float, resident: int,
                       programs: int, multiprocessors: int, bandwidth_gbps: float) -> dict:
    """The bandwidth model (benchmarks/README.md, "The model"): the share of copy bandwidth, and its parts."""
    required = bandwidth_gbps * read_share / multiprocessors  # read bytes per ns that one multiprocessor must pull
    per_program = iterations * loaded_per_iteration / (iterations * iteration_ns + program_overhead_ns)
    waves = programs / (multiprocessors * resident)

    def speed(blocks):
        return min(1.0, blocks * per_program / required) if blocks > 0 else 1.0

    full, last = math.floor(waves), waves - math.floor(waves)
    time = full / speed(resident) + (last / speed(last * resident) if last > 0 else 0.0)
    concurrency = waves / time if time > 0 else 1.0
    return dict(program_read_gbps=per_program, required_gbps_per_multiprocessor=required, waves=waves,
                concurrency_factor=concurrency, traffic_factor=minimum / bytes_moved,
                predicted_pct_of_copy=100.0 * minimum / bytes_moved * concurrency)


# ----------------------------------------------------------------------------------------------
# Compiling and reading
# ----------------------------------------------------------------------------------------------

def _stream_lines(kernel_source: str) -> set:
    """Source line numbers (1-based) of the kernel file that touch a stream."""
    return {number for number, line in enumerate(kernel_source.splitlines(), 1)
            if any(re.search(rf"\b{name}\b", line) for name in STREAM_POINTERS) and ("tl.load" in line or
                                                                                  "tl.store" in line)}


def analyse(compiled, config, launch_programs: int, case: Case, shape: tuple, tokens: int, element: int,
            arch: int, partial_rows: int, kernel_file: str, stream_lines: set) -> dict:
    """One (case, config) row of the report from its CompiledKernel."""
    from ..kernels import cross_compile

    num_heads, head_dim = shape
    cubin = compiled.asm["cubin"]
    usage = cross_compile.resources(cubin)
    limits = cross_compile.TARGETS[arch]
    warps = config.num_warps
    resident, by_registers, limit = resident_blocks(usage["registers"], warps, usage["shared_bytes"], limits)
    try:
        sass = cross_compile.disassemble(cubin)
    except (RuntimeError, subprocess.CalledProcessError):
        sass = None  # widths from the PTX; no barrier or shuffle counts
    if sass is not None:
        accesses, width_source = cross_compile.memory_accesses(sass), "sass"
        counts = cross_compile.sass_counts(sass)
    else:
        accesses, width_source = cross_compile.ptx_memory_accesses(compiled.asm["ptx"]), "ptx"
        counts = {"BAR.SYNC": None, "SHFL": None}
    streams = [a for a in accesses if a.file == kernel_file and a.line in stream_lines]
    histogram = {}
    for access in streams:
        histogram[access.opcode] = histogram.get(access.opcode, 0) + 1
    loops = cross_compile.reductions(compiled.asm["ttgir"])
    trips = cross_compile.round_trips(compiled.asm["ttgir"],
                                      lambda file, line: file == kernel_file and line in stream_lines)
    bytes_moved, minimum = traffic(case, num_heads, head_dim, tokens, element, partial_rows)
    block_t = config.kwargs["BLOCK_T"]
    loaded = loaded_per_iteration(case, num_heads, head_dim, block_t, element)
    if case.kernel == "forward":
        iterations, overhead = 1, 0.0  # the slot lookup overlaps the tile's load
    else:
        iterations = max(1, math.ceil(math.ceil(tokens / max(partial_rows, 1)) / block_t))
        overhead = (loops["total"] - loops["inside_loops"]) * REDUCTION_NS
    iteration_ns = (trips * LATENCY_NS + loops["inside_loops"] * REDUCTION_NS
                    + loops["conversions_inside_loops"] * CONVERSION_NS)
    model = predicted_fraction(bytes_moved, minimum, _read_share(case, num_heads), loaded, iterations, iteration_ns,
                               overhead, resident, launch_programs, limits["multiprocessors"], CARDS[arch][1])
    return dict(
        block_t=config.kwargs["BLOCK_T"], num_warps=warps, num_stages=config.num_stages, programs=launch_programs,
        **usage, resident_blocks=resident, resident_limit=limit, resident_blocks_by_registers=by_registers,
        width_source=width_source, stream_access_bits=histogram,
        min_stream_bits=min((access.bits for access in streams), default=None),
        reductions=loops["total"], reductions_in_loops=loops["inside_loops"],
        conversions_in_loops=loops["conversions_inside_loops"], barriers=counts["BAR.SYNC"], shuffles=counts["SHFL"],
        round_trips=trips, iterations_per_program=iterations, bytes=bytes_moved, min_bytes=minimum, **model)


def _read_share(case: Case, num_heads: int) -> float:
    """Reads / (reads + writes) of the stream traffic, for the read share of the bandwidth."""
    k = case.selected(num_heads)
    if case.kernel == "forward":
        saved = k / num_heads if case.save_selected and k < num_heads else 0.0
        return 1.0 / (2.0 + saved)
    if not case.need_grad_z:
        return 1.0
    saved = (1.0 if k == num_heads else k / num_heads) if case.need_grad_scale else 0.0
    return (1.0 + saved) / (2.0 + saved)


def run_case(case: Case, arch: int, shape_name: str, tokens: int, dtype: torch.dtype) -> list:
    """Compile every kept config of one case for `arch`; one row per config.

    Args:
        case: the launch, one of CASES.
        arch: the compute capability, a key of `cross_compile.TARGETS` (80, 86, 89, 90).
        shape_name: the layer shape, a key of SHAPES.
        tokens: tokens in the batch.
        dtype: of the activations.
    """
    import triton

    from ..kernels import cross_compile, head_affine

    num_heads, head_dim = SHAPES[shape_name]
    with cross_compile.CrossCompiler(arch) as compiler:
        launcher = compiler.forward if case.kernel == "forward" else compiler.backward
        launcher(*case_inputs(case, num_heads, head_dim, tokens, dtype))
    kernel_file = os.path.basename(head_affine.__file__)
    with open(head_affine.__file__) as handle:
        stream_lines = _stream_lines(handle.read())
    element = torch.finfo(dtype).bits // 8
    rows = []
    for launch in compiler.launches:
        fixed = head_affine.fixed_config(launch.kept, triton.next_power_of_2(head_dim))
        for config, compiled in launch.compiled:
            programs = launch.programs(config)
            row = dict(case=case.name, what=case.what, kernel=case.kernel, shape=shape_name, heads=num_heads,
                       head_dim=head_dim, k=case.selected(num_heads), tokens=tokens,
                       dtype=str(dtype).replace("torch.", ""), arch=arch, deterministic_config=config is fixed)
            row.update(analyse(compiled, config, programs, case, (num_heads, head_dim), tokens, element, arch,
                               programs // case.grid_columns(num_heads), kernel_file, stream_lines))
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Output and command line
# ----------------------------------------------------------------------------------------------

def summary_rows(rows: list) -> list:
    """Per (case, shape, tokens): the config deterministic mode runs, and the best-predicted kept config."""
    groups = {}
    for row in rows:
        groups.setdefault((row["case"], row["shape"], row["tokens"]), []).append(row)
    summary = []
    for group in groups.values():
        fixed = next(row for row in group if row["deterministic_config"])
        best = max(group, key=lambda row: row["predicted_pct_of_copy"])
        worst = min(group, key=lambda row: row["predicted_pct_of_copy"])
        summary.append(dict(fixed=fixed, best=best, worst=worst, configs=len(group),
                            registers=(min(r["registers"] for r in group), max(r["registers"] for r in group)),
                            any_spills=any(r["spills"] for r in group),
                            min_stream_bits=min((r["min_stream_bits"] for r in group if r["min_stream_bits"]),
                                                default=None)))
    return summary


def format_table(rows: list) -> str:
    header = ("case", "shape", "tokens", "configs", "regs", "spills", "stream bits", "loop reductions", "round trips",
              "bytes/min", "pred. %copy: fixed", "best", "worst", "best config")
    cells = []
    for item in summary_rows(rows):
        fixed, best = item["fixed"], item["best"]
        low, high = item["registers"]
        cells.append((fixed["case"], fixed["shape"], str(fixed["tokens"]), str(item["configs"]),
                      f"{low}-{high}" if low != high else str(low), "yes" if item["any_spills"] else "no",
                      str(item["min_stream_bits"]), str(fixed["reductions_in_loops"]), str(fixed["round_trips"]),
                      f"{fixed['bytes'] / fixed['min_bytes']:.3f}", f"{fixed['predicted_pct_of_copy']:.0f}",
                      f"{best['predicted_pct_of_copy']:.0f}", f"{item['worst']['predicted_pct_of_copy']:.0f}",
                      f"T{best['block_t']} w{best['num_warps']}"))
    lines = aligned_table(header, cells, left_columns=(0, 1))
    lines.append("A static PREDICTION from compiled code and a bandwidth model (see benchmarks/README.md), "
                 "not a measurement.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit bench --static",
                                     description="Compile the kernels for a GPU target and predict their bandwidth "
                                                 "(see lofit_fast/bench/static.py and benchmarks/README.md).")
    parser.add_argument("--target", type=comma_list(convert=int), default=[90],
                        help="compute capabilities, e.g. 90 or 80,90 (default: 90)")
    parser.add_argument("--case", type=comma_list(CASE_NAMES), help=f"{', '.join(CASE_NAMES)} (default: all)")
    parser.add_argument("--shape", type=comma_list(tuple(SHAPES)), help="default: llama2-7b,llama2-13b")
    parser.add_argument("--tokens", type=comma_list(convert=parse_tokens), help="default: 4k,16k")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="a folder, or a .json file for one target")
    return parser


def main(argv=None) -> int:
    """Compile the cases for each target, print a summary table and write a JSON per target; 0 on success, 2 when
    this machine cannot compile for a GPU target.

    Args:
        argv: the command line without the program name (default: sys.argv[1:]); `--help` lists the options:
            --target (compute capabilities), --case, --shape, --tokens, --dtype, --output.
    """
    args = build_parser().parse_args(argv)
    if triton_interpreter_enabled():
        # Triton's own @jit library was built for its interpreter in this process and cannot be compiled.
        progress("TRITON_INTERPRET=1: compiling in a fresh process without it")
        environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "lofit_fast.bench.static", *argv], env=environment).returncode
    from ..kernels import cross_compile

    reason = cross_compile.unavailable_reason()
    if reason is not None:
        print(f"lofit bench --static: cannot compile for a GPU target here: {reason}", file=sys.stderr)
        return 2
    import triton

    cases = [case for case in CASES if args.case is None or case.name in args.case]
    date = datetime.date.today().isoformat()
    for arch in args.target:
        if arch not in cross_compile.TARGETS:
            raise SystemExit(f"--target {arch}: known targets are {sorted(cross_compile.TARGETS)}")
        rows = []
        for shape in args.shape or ["llama2-7b", "llama2-13b"]:
            for tokens in args.tokens or [4096, 16384]:
                for case in cases:
                    progress(f"sm_{arch} {shape} {tokens} tokens {case.name}")
                    rows += run_case(case, arch, shape, tokens, DTYPES[args.dtype])
        card, bandwidth = CARDS[arch]
        result = dict(kind="static prediction, not a measurement", target=f"sm_{arch}", date=date,
                      card=card, card_bandwidth_gbps=bandwidth, latency_ns=LATENCY_NS, reduction_ns=REDUCTION_NS,
                      conversion_ns=CONVERSION_NS,
                      multiprocessors=cross_compile.TARGETS[arch]["multiprocessors"], triton=triton.__version__,
                      torch=torch.__version__, cases=[asdict(case) for case in cases], rows=rows)
        path = output_path(args.output, f"sm{arch}", date, prefix="static-")
        print(f"sm_{arch} ({card}, {bandwidth:g} GB/s, {LATENCY_NS:g} ns assumed latency)")
        print(format_table(rows))
        write_results(result, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
