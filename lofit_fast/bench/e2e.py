"""End-to-end benchmark of LoFiT training steps on bitsandbytes bases: `lofit bench --e2e` and
`benchmarks/bench_e2e.py`.

    python benchmarks/bench_e2e.py                          # GPU: llama2-7b, llama2-13b x nf4, int8
    python benchmarks/bench_e2e.py --models llama2-13b --quant nf4 --impl lofit_fast,floor
    python benchmarks/bench_e2e.py --quick                  # CPU smoke run (CI, seconds)

Builds Llama-2-shaped models with random weights, quantized to NF4 or LLM.int8 one layer at a time on the
device, and times training steps (forward, backward, AdamW) of each method (step1, step2, step2-scale) for each
implementation: the frozen floor, lofit_fast, the paper's per-head hook and QLoRA. On GPU: peak memory and the
largest batch under a 24 GB cap; on CPU: bytes saved for backward. A table on stdout and
`benchmarks/results/e2e-<device>-<date>.json`; methods, timing, memory figures and row keys: benchmarks/README.md.
"""

import argparse
import contextlib
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..patch import find_o_projs, patch_model
from ..settings import PAPER_SETTINGS_BY_MODEL
from .common import (
    DTYPES,
    add_run_arguments,
    aligned_table,
    comma_list,
    cuda_peak_mb,
    eager_hook_transform,
    format_number,
    free_memory,
    output_path,
    pick_device,
    progress,
    random_heads,
    rotation,
    run_header,
    synchronize,
    wall_ms,
    write_results,
)

IMPLS = ("floor", "lofit_fast", "eager_hook", "qlora")
METHODS = ("step1", "step2", "step2-scale")
STEP1_L1 = PAPER_SETTINGS_BY_MODEL["llama-2-7b"]["truthfulqa"]["select"].l1_lambda  # the step-1 penalty timed
QUANTS = ("nf4", "int8")
# Llama-2 shapes (vocab 32000, MHA, head_dim 128).
MODELS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
# Step-2 heads for Llama-2-13B in the paper; 1.2 heads per layer on 13B, 1.5 on 7B.
PAPER_K = PAPER_SETTINGS_BY_MODEL["llama-2-13b"]["truthfulqa"]["k"]
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# Building a quantized model from a config, layer by layer
# ----------------------------------------------------------------------------------------------

def llama_config(name: str, layers: Optional[int] = None, width_divisor: int = 1):
    """The LlamaConfig of a Llama-2 shape; `layers` keeps only that many decoder layers, `width_divisor`
    divides hidden size, heads and MLP width (head_dim stays 128)."""
    from transformers import LlamaConfig

    shape = dict(MODELS[name])
    heads = max(1, shape["num_attention_heads"] // width_divisor)
    return LlamaConfig(
        vocab_size=32000, hidden_size=heads * 128, intermediate_size=shape["intermediate_size"] // width_divisor,
        num_hidden_layers=layers or shape["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_quantized_model(config, quant: str, device: torch.device, dtype=torch.bfloat16, seed: int = 0):
    """A LlamaForCausalLM with random weights whose decoder linears are bitsandbytes layers, built on the
    meta device and materialized one tensor at a time on `device` (benchmarks/README.md). Frozen, train mode."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                quantized = _quantized_linear(module, quant, device, dtype, generator)
                setattr(layer.get_submodule(parent_name) if parent_name else layer, child, quantized)
        _materialize(layer, device, dtype, generator)
    _materialize(model, device, dtype, generator)  # embeddings, final norm, lm_head
    with torch.device(device):  # the rotary embedding's inv_freq buffer was made on the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.train()


def _random_weight(shape, device, dtype, generator):
    return torch.randn(shape, device=device, dtype=dtype, generator=generator) * 0.02


def _quantized_linear(linear: nn.Linear, quant: str, device, dtype, generator) -> nn.Module:
    import bitsandbytes as bnb

    weight = _random_weight((linear.out_features, linear.in_features), device, dtype, generator)
    if quant == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                         module=layer)._quantize(device)
    elif quant == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)._quantize(device)
    else:
        raise ValueError(f"quant {quant!r} is not one of {QUANTS}")
    return layer


def _materialize(module: nn.Module, device, dtype, generator) -> None:
    """Give every parameter still on the meta device real storage: norms ones, others random."""
    for owner in module.modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is None or parameter.device.type != "meta":
                continue
            if "norm" in type(owner).__name__.lower():
                data = torch.ones(parameter.shape, device=device, dtype=dtype)
            else:
                data = _random_weight(parameter.shape, device, dtype, generator)
            owner._parameters[name] = nn.Parameter(data, requires_grad=False)


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------

@dataclass
class Attached:
    """An implementation attached to the model: what to call, what to train, how to take it off."""

    runner: nn.Module
    trained: list
    detach: Callable[[], None]
    penalty: Optional[Callable[[], torch.Tensor]] = None  # added to the loss (step 1's L1 term)


def method_heads(method: str, num_layers: int, num_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """The heads a method trains: every head for step 1, K seeded random ones for step 2."""
    if method == "step1":
        return [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    return random_heads(num_layers, num_heads, k, seed)


def attach(impl: str, model: nn.Module, heads: list, method: str = "step2") -> Attached:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if impl == "floor":
        return _attach_floor(model, heads)
    if impl == "lofit_fast":
        return _attach_lofit(model, heads, method)
    if impl == "eager_hook":
        return _attach_eager_hook(model, heads, method)
    if impl == "qlora":
        return _attach_qlora(model)
    raise ValueError(f"impl {impl!r} is not one of {IMPLS}")


def _attach_floor(model, heads) -> Attached:
    lowest = min(layer for layer, _ in heads)
    # detach(): LLM.int8's output can be a view made inside its autograd Function, whose flags cannot change.
    hook = find_o_projs(model)[lowest].register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_())
    return Attached(model, [], hook.remove)


def _trains(method: str) -> tuple[bool, bool]:
    """(scale, offset) trained by a method."""
    return {"step1": (True, False), "step2": (False, True), "step2-scale": (True, True)}[method]


def _attach_lofit(model, heads, method) -> Attached:
    train_scale, train_offset = _trains(method)
    handle = patch_model(model, heads, scale=train_scale, offset=train_offset)
    trained = [parameter for parameter in (handle.scale, handle.offset) if parameter is not None]
    with torch.no_grad():
        for parameter in trained:
            parameter.normal_(0.0, 1e-3)
    penalty = (lambda: STEP1_L1 * handle.scale.abs().sum()) if method == "step1" else None
    return Attached(model, trained, handle.remove, penalty)


def _attach_eager_hook(model, heads, method) -> Attached:
    """Per-head (A, v) on every head of every layer, applied head by head, as the paper's code has them; the
    method's parameters are trained on `heads`. The others are frozen: A at 0, v drawn like the trained ones (at 0
    when the method trains no offsets)."""
    config = model.config
    num_heads, head_dim = config.num_attention_heads, config.head_dim
    device = next(model.parameters()).device
    selected = set(heads)
    train_scale, train_offset = _trains(method)
    hooks, trained, scales_trained = [], [], []

    def parameter(train, on, random):
        value = torch.randn(head_dim, device=device) * 1e-3 if random else torch.zeros(head_dim, device=device)
        return value.requires_grad_(train and on)

    for layer, o_proj in enumerate(find_o_projs(model)):
        on = [(layer, head) in selected for head in range(num_heads)]
        scales = [parameter(train_scale, on[head], train_scale and on[head]) for head in range(num_heads)]
        offsets = [parameter(train_offset, on[head], train_offset) for head in range(num_heads)]
        scales_trained += [scale for scale in scales if scale.requires_grad]
        trained += [p for p in scales + offsets if p.requires_grad]
        hooks.append(o_proj.register_forward_pre_hook(
            lambda module, args, scales=scales, offsets=offsets: (
                eager_hook_transform(args[0], scales, offsets).to(args[0].dtype), *args[1:])))

    def detach():
        for hook in hooks:
            hook.remove()

    penalty = (lambda: STEP1_L1 * sum(scale.abs().sum() for scale in scales_trained)) if method == "step1" else None
    return Attached(model, trained, detach, penalty)


def _attach_qlora(model) -> Attached:
    try:
        import peft
    except ImportError:
        raise ImportError("the qlora baseline needs PEFT: pip install peft") from None
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["o_proj"], bias="none",
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    trained = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    return Attached(peft_model, trained, peft_model.unload)


# ----------------------------------------------------------------------------------------------
# One training step, and what it costs
# ----------------------------------------------------------------------------------------------

def make_step(attached: Attached, batch: int, seq: int, vocab: int, device) -> Callable[[], None]:
    """forward + backward of the LM loss on random ids, then AdamW on the trained parameters."""
    ids = torch.randint(3, vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    optimizer = torch.optim.AdamW(attached.trained, lr=1e-3) if attached.trained else None

    def step():
        loss = attached.runner(input_ids=ids, labels=ids).loss
        if attached.penalty is not None:
            loss = loss + attached.penalty()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def step_ms(step: Callable, device, warmup: int, steps: int) -> float:
    """Median wall time of `steps` steps after `warmup` steps (synchronized on CUDA)."""
    for _ in range(warmup):
        step()
    return statistics.median([wall_ms(step, device) for _ in range(steps)])


def saved_for_backward_mb(attached: Attached, batch: int, seq: int, vocab: int, device) -> float:
    """MB that autograd saves for backward during one forward: the CPU memory proxy (storages counted once,
    parameters and buffers not at all; benchmarks/README.md says what it leaves out)."""
    model = attached.runner
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(storages.values()) / 2**20


def fits(step_factory: Callable[[int], Callable], batch: int, device) -> bool:
    """Whether one step at `batch` runs without running out of memory (under the cap)."""
    out_of_memory = False
    try:
        step_factory(batch)()
        synchronize(device)
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # leave the except block first, so the traceback's frames are freed
    free_memory(device)
    return not out_of_memory


def largest_batch(step_factory: Callable[[int], Callable], device, max_batch: int) -> int:
    """The largest batch <= max_batch for which a step fits: doubling, then bisection. 0 if none does."""
    if not fits(step_factory, 1, device):
        return 0
    good, bad = 1, None
    while bad is None and good < max_batch:
        candidate = min(2 * good, max_batch)
        if fits(step_factory, candidate, device):
            good = candidate
        else:
            bad = candidate
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(step_factory, middle, device) else (good, middle)
    return good


# ----------------------------------------------------------------------------------------------
# Running one model
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    dtype: str  # of activations, unquantized weights and 4-bit compute
    seq: int
    batch: Optional[int]  # None: search (GPU)
    max_batch: int
    warmup: int
    steps: int
    k: Optional[int]
    layers: Optional[int]
    width_divisor: int
    seed: int
    methods: tuple = ("step2",)
    own_batch: bool = True  # GPU: also measure each impl at its own largest batch


def run_model(name: str, quant: str, impls: list, settings: Settings, device) -> list[dict]:
    """Build one quantized model and measure every method and implementation on it; a row per (method, impl).

    Args:
        name: a key of MODELS (llama2-7b, llama2-13b).
        quant: "nf4" or "int8".
        impls: implementations to measure, from IMPLS.
        settings: dtype, sequence length, batch, steps, layers kept, methods... (see Settings).
        device: where the model is built and run.
    """
    config = llama_config(name, settings.layers, settings.width_divisor)
    progress(f"{name} ({config.num_hidden_layers} layers, hidden {config.hidden_size}) {quant}: building")
    model = build_quantized_model(config, quant, device, DTYPES[settings.dtype], settings.seed)
    rows = []
    for method in settings.methods:
        rows += _run_method(model, config, name, quant, method, impls, settings, device)
    del model
    free_memory(device)
    return rows


def _run_method(model, config, name, quant, method, impls, settings, device) -> list[dict]:
    full_layers = MODELS[name]["num_hidden_layers"]
    k = settings.k or max(1, round(PAPER_K * config.num_hidden_layers / full_layers))
    heads = method_heads(method, config.num_hidden_layers, config.num_attention_heads, k, settings.seed)
    progress(f"  {method}: {len(heads)} heads")
    common = dict(method=method, model=name, quant=quant, dtype=settings.dtype, layers=config.num_hidden_layers,
                  hidden=config.hidden_size, seq=settings.seq, k=len(heads),
                  lowest_layer=min(layer for layer, _ in heads), max_batch=None, fits_24gb=None,
                  peak_mb_at_max_batch=None, tokens_per_s_at_max_batch=None)
    rows = {impl: dict(impl=impl, **common) for impl in impls}

    def measure(impl, body):
        attached = attach(impl, model, heads, method)
        try:
            return body(attached)
        finally:
            attached.detach()
            free_memory(device)

    def factory(attached):
        return lambda batch: make_step(attached, batch, settings.seq, config.vocab_size, device)

    if device.type == "cuda":
        for impl in impls:
            progress(f"  {method} {impl}: largest batch")
            rows[impl]["max_batch"] = measure(impl, lambda a: largest_batch(factory(a), device, settings.max_batch))
            rows[impl]["fits_24gb"] = rows[impl]["max_batch"] > 0
        fitting = [row["max_batch"] for row in rows.values() if row["max_batch"] > 0]
        batch = settings.batch or (min(fitting) if fitting else 1)
    else:
        batch = settings.batch or 1
    progress(f"  {method}: every impl at batch {batch}: memory, then {settings.steps} interleaved timing rounds")
    for impl in impls:
        rows[impl].update(measure(impl, lambda a: _memory_at(a, factory(a), batch, settings, config, device)))
    runnable = [impl for impl in impls if rows[impl]["fits_at_batch"]]
    for impl, milliseconds in interleaved_step_ms(runnable, measure, factory, batch, settings, device).items():
        rows[impl].update(ms=milliseconds, tokens_per_s=batch * settings.seq / milliseconds * 1e3)
    if device.type == "cuda" and settings.own_batch:
        for impl in impls:
            row = rows[impl]
            if row["max_batch"] > 0:
                progress(f"  {method} {impl}: at its largest batch, {row['max_batch']}")
                peak, milliseconds = measure(impl, lambda a: _at_own_batch(factory(a), row["max_batch"], settings,
                                                                           device))
                if milliseconds is not None:
                    row.update(peak_mb_at_max_batch=peak,
                               tokens_per_s_at_max_batch=row["max_batch"] * settings.seq / milliseconds * 1e3)
    _compare_with_floor(rows)
    return list(rows.values())


def _memory_at(attached, factory, batch, settings, config, device) -> dict:
    """GPU: peak_mb and step_mb of one step after a warm-up; CPU: saved_mb. None where it does not fit."""
    row = dict(batch=batch, trained_params=sum(p.numel() for p in attached.trained), peak_mb=None,
               step_mb=None, saved_mb=None, ms=None, tokens_per_s=None, fits_at_batch=True)
    if device.type == "cuda":
        if not fits(factory, batch, device):  # also the warm-up: optimizer state exists from here on
            row["fits_at_batch"] = False
            return row
        row["peak_mb"], row["step_mb"] = cuda_peak_mb(factory(batch), device)
    else:
        row["saved_mb"] = saved_for_backward_mb(attached, batch, settings.seq, config.vocab_size, device)
    return row


def interleaved_step_ms(impls: list, measure: Callable, factory: Callable, batch: int, settings: Settings,
                        device) -> dict:
    """Median step time of each impl over `settings.steps` rounds; each round attaches every impl in turn
    (in a rotated order), runs `settings.warmup` untimed steps and times one. Interleaving spreads any
    slowdown of the machine (other processes, clocks) over all impls alike."""
    times = {impl: [] for impl in impls}
    for round_index in range(settings.steps):
        for impl in rotation(impls, round_index):
            times[impl].append(measure(impl, lambda a: step_ms(factory(a)(batch), device, settings.warmup, 1)))
    return {impl: statistics.median(values) for impl, values in times.items()}


def _at_own_batch(factory, batch, settings, device) -> tuple:
    """(peak MB, median ms) at `batch` (GPU); (None, None) if it no longer fits (fragmentation)."""
    if not fits(factory, batch, device):
        return None, None
    step = factory(batch)
    milliseconds = step_ms(step, device, settings.warmup, settings.steps)
    return cuda_peak_mb(step, device)[0], milliseconds


def _compare_with_floor(rows: dict) -> None:
    floor = rows.get("floor")
    for row in rows.values():
        for key, ratio in (("peak_mb", "peak_vs_floor"), ("step_mb", "step_mb_vs_floor"),
                           ("saved_mb", "saved_vs_floor"), ("ms", "time_vs_floor")):
            base = floor.get(key) if floor else None
            row[ratio] = row[key] / base if base and row.get(key) is not None else None


# ----------------------------------------------------------------------------------------------
# Table and command line
# ----------------------------------------------------------------------------------------------

def format_table(rows: list[dict], device_type: str) -> str:
    """The rows as an aligned text table: GPU columns (peak memory, largest batch) or CPU ones (saved MB)."""
    if device_type == "cuda":
        header = ("method", "model", "quant", "impl", "K", "batch", "peak MB", "step MB", "ms", "tok/s", "x floor mem",
                  "x floor time", "max batch", "tok/s max", "fits 24GB")
        cells = [(r["method"], r["model"], r["quant"], r["impl"], str(r["k"]), str(r["batch"]),
                  format_number(r["peak_mb"], 5), format_number(r["step_mb"], 5), format_number(r["ms"]),
                  format_number(r["tokens_per_s"]), format_number(r["peak_vs_floor"]),
                  format_number(r["time_vs_floor"]), str(r.get("max_batch")),
                  format_number(r.get("tokens_per_s_at_max_batch")), "yes" if r.get("fits_24gb") else "no")
                 for r in rows]
    else:
        header = ("method", "model", "layers", "quant", "impl", "K", "batch", "seq", "saved MB*", "ms", "tok/s",
                  "x floor saved", "x floor time")
        cells = [(r["method"], r["model"], str(r["layers"]), r["quant"], r["impl"], str(r["k"]), str(r["batch"]),
                  str(r["seq"]), format_number(r["saved_mb"]), format_number(r["ms"]),
                  format_number(r["tokens_per_s"]), format_number(r["saved_vs_floor"]),
                  format_number(r["time_vs_floor"])) for r in rows]
    lines = aligned_table(header, cells)
    if device_type != "cuda":
        lines.append("* saved for backward (saved_tensors_hooks): a memory proxy on the CPU, not peak RSS")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit bench --e2e",
        description="LoFiT training steps on quantized bases (see lofit_fast/bench/e2e.py and benchmarks/README.md).")
    parser.add_argument("--models", type=comma_list(tuple(MODELS)), help="llama2-7b,llama2-13b (default: both)")
    parser.add_argument("--quant", type=comma_list(QUANTS), help="nf4,int8 (default: both)")
    parser.add_argument("--method", type=comma_list(METHODS),
                        help="step1 (scales on every head), step2 (offsets on K heads), step2-scale (scales and "
                             "offsets on K heads); default: all three")
    parser.add_argument("--impl", type=comma_list(IMPLS),
                        help=f"{','.join(IMPLS)} (default: all; qlora only when peft is installed)")
    parser.add_argument("--k", type=int, help=f"selected heads (default {PAPER_K}, scaled with the layers kept)")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="activations, unquantized weights, 4-bit compute (default: bf16 on GPU; fp32 on CPU, "
                             "where bf16 matmuls are emulated and 25x slower)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: 512 on GPU, 128 on CPU)")
    parser.add_argument("--batch", type=int, help="batch for the comparison (default: GPU the smallest largest "
                        "batch over the impls, CPU 1)")
    parser.add_argument("--max-batch", type=int, default=64, help="upper end of the batch search (GPU)")
    parser.add_argument("--cap-gb", type=float, default=24.0,
                        help="GPU memory cap in GiB (set_per_process_memory_fraction); 0: none (default 24)")
    parser.add_argument("--layers", type=int, help="decoder layers to keep (default: all on GPU, 2 on CPU)")
    parser.add_argument("--width-divisor", type=int, default=1, help="divide widths (head_dim stays 128)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-own-batch", action="store_true",
                        help="GPU: skip measuring each impl again at its own largest batch (saves time)")
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 narrow layers (width / 8), seq 32, batch 2, one timed step, "
                             "1 CPU thread")
    return parser


def _settings(args, on_gpu: bool) -> Settings:
    quick = args.quick
    return Settings(
        dtype=args.dtype or ("bf16" if on_gpu else "fp32"),
        seq=args.seq or (32 if quick else 512 if on_gpu else 128),
        batch=args.batch or (2 if quick else None if on_gpu else 1),
        max_batch=args.max_batch, warmup=args.warmup,
        steps=args.steps or (1 if quick else 5 if on_gpu else 3), k=args.k,
        layers=args.layers or (2 if quick or not on_gpu else None),
        width_divisor=8 if quick and args.width_divisor == 1 else args.width_divisor, seed=args.seed,
        methods=tuple(args.method or METHODS), own_batch=not args.no_own_batch)


def _impls(named: Optional[list]) -> list:
    if named is not None:
        return named
    try:
        import peft  # noqa: F401
    except ImportError:
        progress("note: peft is not installed, so the qlora baseline is skipped (pip install peft)")
        return [impl for impl in IMPLS if impl != "qlora"]
    return list(IMPLS)


def main(argv=None) -> int:
    """Run the end-to-end benchmark, print its table and write its JSON; 0 on success.

    Args:
        argv: the command line without the program name (default: sys.argv[1:]); `--help` lists the options:
            --models, --quant, --method, --impl pick the rows; --k, --dtype, --seq, --batch, --max-batch, --cap-gb,
            --layers, --width-divisor, --steps, --warmup, --seed, --no-own-batch shape the run; --device, --threads,
            --output; --quick (a smoke run: 2 narrow layers, seq 32, batch 2, one timed step, 1 CPU thread).
    """
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads or (args.quick and not on_gpu):
        torch.set_num_threads(args.threads or 1)  # quick: tiny ops, where waking threads costs more than work
    settings = _settings(args, on_gpu)
    impls = _impls(args.impl)
    cap = _cap_memory(device, args.cap_gb) if on_gpu else None
    rows = []
    for name in args.models or list(MODELS):
        for quant in args.quant or list(QUANTS):
            rows += run_model(name, quant, impls, settings, device)
    result = dict(**run_header(device), bitsandbytes=_version("bitsandbytes"), transformers=_version("transformers"),
                  peft=_version("peft"), cap_gb=cap, quick=args.quick, settings=asdict(settings), rows=rows)
    path = output_path(args.output, result["device"], result["date"], "-quick" if args.quick else "", prefix="e2e-")
    print(f"device: {result['device']}" + (f" (capped at {cap:g} GiB)" if cap else ""))
    print(format_table(rows, device.type))
    if not on_gpu:
        print("GPU numbers (peak memory, the 24 GB cap, the real 7B / 13B shapes) are not measured by a CPU run.")
    write_results(result, path)
    return 0


def _cap_memory(device, cap_gb: float) -> Optional[float]:
    if not cap_gb:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GIB / total), device)
    return cap_gb


def _version(package: str) -> Optional[str]:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version(package)
    return None


if __name__ == "__main__":
    sys.exit(main())
