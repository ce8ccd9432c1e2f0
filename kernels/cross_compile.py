"""Compile the head_affine kernels for CUDA targets on a machine without a GPU, and read what came out.

`CrossCompiler(arch)` installs a Triton driver whose target is `GPUTarget("cuda", arch, 32)` and whose
benchmarker runs nothing, and builds the kernels with `HeadAffineKernels(compile_only=True)`: launches go through
the code a GPU runs (specialization, autotune keys and pruning, the grid) and compile instead of running; the
triton wheel's ptxas makes the cubin. Tensors may be on the meta device.

    with CrossCompiler(90) as compiler:
        compiler.forward(z, head_index, scale, offset, True)       # z etc. on the meta device
    for launch in compiler.launches: ...                          # kernel name, kept configs, binaries

`resources` / `memory_accesses` read a cubin (registers, spills, the width of every global access). Which
configs compile, and the Triton internals this relies on (checked by `unavailable_reason`): kernels/README.md.
"""

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton

# Each architecture's per-multiprocessor limits (CUDA programming guide, "compute capabilities") and the
# multiprocessors of the card it is predicted for (lofit_fast.bench.static.CARDS names it), for the occupancy
# figures.
TARGETS = {
    80: dict(multiprocessors=108, max_warps=64, max_blocks=32, registers=65536, shared_kib=164),
    86: dict(multiprocessors=84, max_warps=48, max_blocks=16, registers=65536, shared_kib=100),
    89: dict(multiprocessors=128, max_warps=48, max_blocks=24, registers=65536, shared_kib=100),
    90: dict(multiprocessors=132, max_warps=64, max_blocks=32, registers=65536, shared_kib=228),
}


def _tool(name: str) -> Optional[str]:
    """Path of a CUDA tool that ships in the triton wheel (ptxas, cuobjdump, nvdisasm), or None."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        try:
            path = getattr(knobs.nvidia, name).path
            if path and os.path.exists(path):
                return path
        except (AttributeError, RuntimeError):
            pass
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def unavailable_reason() -> Optional[str]:
    """Why this Triton cannot compile for a CUDA target without a GPU, or None when it can."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as error:
        return f"this Triton ({triton.__version__}) lacks a module the cross-compiler needs: {error}"
    if not (hasattr(driver, "set_active") and hasattr(driver, "_active")):
        return f"this Triton ({triton.__version__}) cannot swap its active driver (triton.runtime.driver.set_active)"
    if not hasattr(JITFunction, "add_pre_run_hook"):
        return f"this Triton ({triton.__version__}) has no JITFunction.add_pre_run_hook"
    if _tool("ptxas") is None:
        return "no ptxas: the triton wheel for Linux x86-64 ships one in triton/backends/nvidia/bin"
    return None


class CompileOnlyDriver:
    """A Triton driver for a CUDA target with no device behind it: launches compile and nothing runs."""

    def __init__(self, target, benchmarker):
        self.target, self._benchmarker = target, benchmarker

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        return self._benchmarker

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("a compile-only driver builds no launcher")


class _Probe(Exception):
    """Raised by the pre-run hook while the benchmarker asks which config a benchmark call is for."""

    def __init__(self, kernel, args, kwargs):
        super().__init__("probe")
        self.kernel, self.args, self.kwargs = kernel, args, kwargs


@dataclass
class Launch:
    """One launch: which kernel, the configs the pruning kept (in the order the autotuner offered them; just the
    one launched when it offered none), and what was compiled: (config, CompiledKernel) pairs."""

    kernel: str
    kept: list = field(default_factory=list)
    compiled: list = field(default_factory=list)
    grid: Optional[object] = None  # the launch's grid(meta) callable

    def programs(self, config) -> int:
        """How many programs the launch runs with `config`."""
        size = 1
        for extent in self.grid(dict(config.kwargs)):
            size *= extent
        return size


def config_of(kwargs: dict, configs: list):
    """The config among `configs` whose meta-parameters and options appear in a launch's kwargs."""
    for config in configs:
        if all(kwargs.get(name) == value for name, value in config.all_kwargs().items()):
            return config
    raise LookupError(f"no config matches {kwargs}")


class CrossCompiler:
    """Context manager: compile-only head_affine kernels for CUDA architecture `arch` (80, 86, 89, 90, ...).
    Call its `forward` / `backward` (HeadAffineKernels' launchers, recording what each launch compiled in
    `launches`) inside the `with` block.

    Args:
        arch: the compute capability as an integer, 90 for sm_90.
        preference: None to compile every config the pruning keeps; else a function of ("forward" or "backward",
            config) whose lowest value among the kept configs picks the one config to compile.
        multiprocessors: sizes the backward grid as on that device (default: the architecture's card in TARGETS).
    """

    def __init__(self, arch: int, preference=None, multiprocessors: Optional[int] = None):
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from triton.backends.compiler import GPUTarget

        from .head_affine import HeadAffineKernels

        self.arch, self.preference = arch, preference
        self.target = GPUTarget("cuda", arch, 32)
        self.multiprocessors = multiprocessors or TARGETS.get(arch, TARGETS[90])["multiprocessors"]
        self.kernels = HeadAffineKernels(interpreted=False, compile_only=True, multiprocessors=self.multiprocessors)
        self.autotuners = {"forward": self.kernels.forward_kernel, "backward": self.kernels.backward_kernel}
        self.launches: list[Launch] = []
        self._probing = False
        self._launch: Optional[Launch] = None
        self._last_kwargs: dict = {}
        for name, autotuner in self.autotuners.items():
            autotuner.fn.add_pre_run_hook(self._pre_run_hook(name))
            # The 'timings' here are made up: never read them from, or write them to, Triton's tuning cache.
            autotuner.cache_results = False

    def __enter__(self):
        from triton.runtime import driver

        # The driver that was active (None until first use): reset_active() would build the default one, which
        # fails on a machine without a GPU.
        self._previous_driver = getattr(driver, "_active", None)
        driver.set_active(CompileOnlyDriver(self.target, self._benchmark))
        return self

    def __exit__(self, *exc_info):
        from triton.runtime import driver

        driver.set_active(self._previous_driver)
        return False

    def forward(self, *args, **kwargs):
        """`HeadAffineKernels.forward`, compiling instead of running."""
        return self._recorded("forward", self.kernels.forward, args, kwargs)

    def backward(self, *args, **kwargs):
        """`HeadAffineKernels.backward`, compiling instead of running."""
        return self._recorded("backward", self.kernels.backward, args, kwargs)

    def _recorded(self, name, launcher, args, kwargs):
        self._launch, before = Launch(name), len(self.kernels.compiled)
        try:
            result = launcher(*args, **kwargs)
        finally:
            launch, self._launch = self._launch, None
        for kernel_name, compiled, grid in self.kernels.compiled[before:]:
            launch.grid = grid
            config = config_of(self._last_kwargs[kernel_name], self.autotuners[kernel_name].configs)
            if not any(kernel is compiled for _, kernel in launch.compiled):
                launch.compiled.append((config, compiled))
            if not launch.kept:
                launch.kept.append(config)
        if launch.compiled:
            self.launches.append(launch)
        return result

    def _pre_run_hook(self, name):
        def hook(*args, **kwargs):
            if self._probing:
                raise _Probe(name, args, kwargs)
            self._last_kwargs[name] = kwargs
        return hook

    def _benchmark(self, kernel_call, quantiles=None, **_):
        """The autotuner's benchmarker: find out which config `kernel_call` is for (the pre-run hook raises before
        anything compiles), compile it or not, and return a 'time' that makes the autotuner pick the config this
        CrossCompiler wants."""
        self._probing = True
        try:
            kernel_call()
        except _Probe as found:
            probe = found
        else:
            raise AssertionError("the autotuner's call reached no kernel")
        finally:
            self._probing = False
        autotuner = self.autotuners[probe.kernel]
        config = config_of(probe.kwargs, autotuner.configs)
        self._launch.kept.append(config)
        if self.preference is None:
            compiled = autotuner.fn.run(*probe.args, grid=(1, 1, 1), warmup=True, **probe.kwargs)
            self._launch.compiled.append((config, compiled))
            return [float(len(self._launch.kept))] * 3  # the first kept config wins; it is compiled already
        return [float(self.preference(probe.kernel, config))] * 3


# ----------------------------------------------------------------------------------------------
# Reading a cubin
# ----------------------------------------------------------------------------------------------

def _with_file(data: bytes, suffix: str, command: list) -> str:
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        return subprocess.run([*command, handle.name], check=True, capture_output=True, text=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers per thread, stack and local memory per thread (bytes; nonzero means spills), static shared
    memory per block, from `cuobjdump --dump-resource-usage`."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("no cuobjdump in the triton wheel or on PATH")
    text = _with_file(cubin, ".cubin", [tool, "--dump-resource-usage"])
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {text!r}")
    registers, stack, shared, local = (int(value) for value in match.groups())
    return dict(registers=registers, stack_bytes=stack, shared_bytes=shared, local_bytes=local,
                spills=stack > 0 or local > 0)


_SASS_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


@dataclass(frozen=True)
class MemoryAccess:
    """A global load or store in the machine code: its opcode, width in bits, and the source line it came from."""

    opcode: str
    bits: int
    file: str
    line: int


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin with source lines (nvdisasm -g -c), which `memory_accesses` and `sass_counts` read.
    RuntimeError when nvdisasm is missing."""
    tool = _tool("nvdisasm")
    if tool is None:
        raise RuntimeError("no nvdisasm in the triton wheel or on PATH")
    return _with_file(cubin, ".cubin", [tool, "-g", "-c"])


def memory_accesses(sass: str) -> list:
    """Every global load (LDG) and store (STG) of the SASS (`disassemble`) with its width and source line."""
    accesses, file, line = [], "", 0
    for row in sass.splitlines():
        location = re.search(r'//## File "([^"]+)", line (\d+)', row)
        if location:
            file, line = os.path.basename(location.group(1)), int(location.group(2))
            continue
        instruction = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG)\.[A-Z0-9_.]+|LDG|STG)\b", row)
        if instruction:
            opcode = instruction.group(1)
            suffixes = opcode.split(".")[1:]
            bits = next((_SASS_WIDTH[suffix] for suffix in suffixes if suffix in _SASS_WIDTH), 32)
            accesses.append(MemoryAccess(opcode, bits, file, line))
    return accesses


def sass_counts(sass: str, opcodes=("BAR.SYNC", "SHFL")) -> dict:
    """How many of each opcode (prefix) the SASS (`disassemble`) holds: by default barriers and shuffles."""
    counts = dict.fromkeys(opcodes, 0)
    for row in sass.splitlines():
        instruction = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", row)
        if instruction:
            for opcode in opcodes:
                if instruction.group(1).startswith(opcode):
                    counts[opcode] += 1
    return counts


_PTX_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
             "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def ptx_memory_accesses(ptx: str) -> list:
    """The global loads and stores of the PTX with their width (vector count x element bits) and source line
    (the .loc before them): the fallback when nvdisasm is missing."""
    files = {number: os.path.basename(name) for number, name in re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', ptx)}
    accesses, file, line = [], "", 0
    for row in ptx.splitlines():
        location = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", row)
        if location:
            file, line = files.get(location.group(1), ""), int(location.group(2))
            continue
        instruction = re.search(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)", row)
        if instruction:
            parts = instruction.group(2).split(".")
            vector = next((int(part[1:]) for part in parts if re.fullmatch(r"v\d", part)), 1)
            element = next((_PTX_BITS[part] for part in parts if part in _PTX_BITS), 32)
            accesses.append(MemoryAccess(instruction.group(1) + ".global" + instruction.group(2),
                                         vector * element, file, line))
    return accesses


def reductions(ttgir: str) -> dict:
    """Reductions (`tt.reduce`) of a kernel's TTGIR, in all and inside a loop (an scf.for region, found by the
    indentation of the printed IR), and layout conversions inside a loop (each a round trip through shared
    memory, usually behind a barrier)."""
    total = inside = conversions = 0
    loops = []  # indentation of the scf.for lines whose region is open
    for row in ttgir.splitlines():
        indent = len(row) - len(row.lstrip())
        if loops and row.strip().startswith("}") and indent == loops[-1]:
            loops.pop()
            continue
        if "tt.reduce" in row and "tt.reduce.return" not in row:
            total += 1
            inside += bool(loops)
        conversions += bool(loops) and "ttg.convert_layout" in row
        if "scf.for" in row and row.rstrip().endswith("{"):
            loops.append(indent)
    return dict(total=total, inside_loops=inside, conversions_inside_loops=conversions)


def _locations(ir: str) -> dict:
    """#locN -> (file name, line) from the location table at the end of an MLIR module."""
    table = dict(re.findall(r"^(#loc\d*) = (loc\(.*\))$", ir, flags=re.MULTILINE))
    resolved = {}

    def resolve(name, depth=0):
        if name in resolved or depth > 50:
            return resolved.get(name)
        text = table.get(name, "")
        direct = re.match(r'loc\("([^"]+)":(\d+):\d+\)', text)
        if direct:
            result = (os.path.basename(direct.group(1)), int(direct.group(2)))
        else:
            inner = re.search(r"(#loc\d*)", text[4:])
            result = resolve(inner.group(1), depth + 1) if inner else None
        resolved[name] = result
        return result

    return {name: resolve(name) for name in table}


def round_trips(ttgir: str, is_stream) -> int:
    """The most memory round trips one iteration of a loop needs (the body of the kernel when it has no loop):
    1 + how often a stream load comes after a stream store in program order, since no load can move above a store
    that may alias it. `is_stream(file, line)` says which source lines access the streams."""
    locations = _locations(ttgir)
    bodies, loops, current = [[]], [], None  # bodies[0]: outside loops
    for row in ttgir.splitlines():
        indent = len(row) - len(row.lstrip())
        if loops and row.strip().startswith("}") and indent == loops[-1][0]:
            loops.pop()
            continue
        operation = re.search(r"\b(tt\.load|tt\.store)\b.*loc\((#loc\d*)\)\s*$", row)
        if operation and locations.get(operation.group(2)) and is_stream(*locations[operation.group(2)]):
            current = loops[-1][1] if loops else 0
            bodies[current].append(operation.group(1))
        if "scf.for" in row and row.rstrip().endswith("{"):
            bodies.append([])
            loops.append((indent, len(bodies) - 1))
    trips = 1
    for body in bodies:
        stores_seen, count = False, 1
        for operation in body:
            if operation == "tt.store":
                stores_seen = True
            elif stores_seen:
                count, stores_seen = count + 1, False
        trips = max(trips, count)
    return trips
