"""Mixed-adapter batches against adapters run one after another: `benchmarks/bench_multi_adapter.py`.

    python benchmarks/bench_multi_adapter.py                                   # CPU defaults, a few minutes
    python benchmarks/bench_multi_adapter.py --device cuda --layers 32 --hidden 4096 --heads 32 \\
        --intermediate 11008 --vocab 32000 --batch 64 --seq 512 --new-tokens 64 # a Llama-2-7B shape on a GPU

Builds a Llama model with random weights, saves A random adapters of each kind (offset only, or scale and
offset) and loads them with `load_adapters`; then serves one batch whose row b belongs to adapter b % A in two
ways, mixed (one call, each row routed to its adapter) and sequential (one call per adapter), for prefill and
greedy generation, with a base row (no adapter) for scale. A table on stdout and
`benchmarks/results/multi-adapter-<device>-<date>.json`; workloads, timing and row keys: benchmarks/README.md.
"""

import argparse
import os
import statistics
import sys
import tempfile
from typing import Callable

import torch
from torch import nn

from ..multi import load_adapters
from ..patch import patch_model
from .common import (
    DTYPES,
    add_run_arguments,
    aligned_table,
    comma_list,
    free_memory,
    interleaved_ms,
    output_path,
    pick_device,
    progress,
    random_heads,
    run_header,
    write_results,
)

KINDS = {"offset": dict(scale=False, offset=True), "scale+offset": dict(scale=True, offset=True)}


def build_model(layers: int, hidden: int, heads: int, intermediate: int, vocab: int, device, dtype) -> nn.Module:
    """A LlamaForCausalLM with random weights (seeded), eval mode, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


def save_random_adapters(model: nn.Module, directory: str, count: int, kind: str, heads_per_adapter: int) -> dict:
    """{name: directory} of `count` adapters of `kind`, each on its own random heads with random values."""
    config = model.config
    directories = {}
    for number in range(count):
        heads = random_heads(config.num_hidden_layers, config.num_attention_heads, heads_per_adapter, seed=number)
        handle = patch_model(model, heads, backend="torch", **KINDS[kind])
        handle.lofit.initialize(0.1, number)
        directories[f"task{number}"] = os.path.join(directory, f"{kind}-{count}-{number}")
        handle.save_pretrained(directories[f"task{number}"])
        handle.remove()
    return directories


def workloads(runner, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> dict[str, Callable]:
    """mode -> a function of (rows, adapter_names or None) running that workload on those rows of the batch;
    `runner` is the handle (adapter_names given) or the bare model (None)."""
    def routing(names):
        return {} if names is None else dict(adapter_names=names)

    def prefill(rows, names):
        with torch.no_grad():
            runner(input_ids=ids[rows], attention_mask=mask[rows], **routing(names))

    def generate(rows, names):
        runner.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **routing(names))

    return dict(prefill=prefill, generate=generate)


def _row(mode, kind, count, strategy, times, batch, seq, new_tokens) -> dict:
    ms = statistics.median(times)
    tokens = batch * (seq if mode == "prefill" else new_tokens)
    return dict(mode=mode, kind=kind, adapters=count, strategy=strategy, batch=batch, seq=seq,
                new_tokens=new_tokens if mode == "generate" else None, ms=ms, tokens_per_s=tokens / ms * 1e3,
                round_ms=times)


def run_multi_adapter_benchmark(model: nn.Module, kinds: list, counts: list, batch: int, seq: int,
                                new_tokens: int, heads_per_adapter: int, rounds: int, backend: str) -> list[dict]:
    """A row per (workload, strategy): the base model, then per adapter kind and count, mixed and sequential
    (row keys: benchmarks/README.md).

    Args:
        model: the Llama model to serve (build_model), frozen, in eval mode.
        kinds: adapter kinds, keys of KINDS ("offset", "scale+offset").
        counts: adapter counts A; each needs a batch of at least A rows.
        batch: rows in the batch; row b goes to adapter b % A.
        seq: prompt tokens per row.
        new_tokens: greedy tokens generated per row.
        heads_per_adapter: random heads each adapter trains.
        rounds: timed rounds after a warm-up round (the median is reported).
        backend: of the routed head transform: "auto", "torch" or "triton".
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    mask = torch.ones_like(ids)
    everything = slice(None)
    rows = []
    base = workloads(model, ids, mask, new_tokens)
    for mode, run in base.items():
        times = interleaved_ms({"base": lambda: run(everything, None)}, rounds, device)["base"]
        rows.append(_row(mode, None, 0, "base", times, batch, seq, new_tokens))
        progress(f"{mode} base: {rows[-1]['ms']:.1f} ms")
    with tempfile.TemporaryDirectory() as directory:
        for kind in kinds:
            for count in counts:
                if count > batch:
                    raise ValueError(f"{count} adapters need a batch of at least {count} rows (--batch {batch})")
                handle = load_adapters(model, save_random_adapters(model, directory, count, kind, heads_per_adapter),
                                       backend=backend)
                names = [handle.adapter_names[b % count] for b in range(batch)]
                subsets = {name: [b for b in range(batch) if names[b] == name] for name in handle.adapter_names}
                for mode, run in workloads(handle, ids, mask, new_tokens).items():
                    def sequential(run=run):
                        for name, subset in subsets.items():
                            run(subset, [name] * len(subset))

                    times = interleaved_ms({"mixed": lambda run=run: run(everything, names),
                                            "sequential": sequential}, rounds, device)
                    mixed = _row(mode, kind, count, "mixed", times["mixed"], batch, seq, new_tokens)
                    alone = _row(mode, kind, count, "sequential", times["sequential"], batch, seq, new_tokens)
                    mixed["speedup"] = alone["ms"] / mixed["ms"]
                    rows += [mixed, alone]
                    progress(f"{mode} {kind} A={count}: mixed {mixed['ms']:.1f} ms, sequential {alone['ms']:.1f} ms "
                             f"({mixed['speedup']:.2f}x)")
                handle.remove()
                free_memory(device)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("mode", "kind", "A", "strategy", "batch", "tokens", "ms", "tokens/s", "speedup")
    cells = [(
        row["mode"], row["kind"] or "-", str(row["adapters"]), row["strategy"], str(row["batch"]),
        str(row["seq"] if row["mode"] == "prefill" else row["new_tokens"]), f"{row['ms']:.1f}",
        f"{row['tokens_per_s']:.0f}", f"{row['speedup']:.2f}x" if "speedup" in row else "") for row in rows]
    lines = aligned_table(header, cells, left_columns=(0, 1, 2, 3))
    return "\n".join(lines) + "\n(tokens: prompt tokens per row for prefill, new tokens per row for generate)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_multi_adapter", description="One mixed-adapter batch against the adapters one after another "
                                                "(see lofit_fast/bench/multi.py and benchmarks/README.md).")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8, help="attention heads (head_dim = hidden / heads)")
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="rows in the batch (row b uses adapter b %% A)")
    parser.add_argument("--seq", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per row")
    parser.add_argument("--adapters", type=comma_list(convert=int), default=[2, 4, 8], help="adapter counts A")
    parser.add_argument("--kinds", type=comma_list(KINDS), default=list(KINDS), help=", ".join(KINDS))
    parser.add_argument("--heads-per-adapter", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up (median)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="model weights (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                        help="of the routed head transform (default: %(default)s)")
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    """Run the multi-adapter benchmark, print its table and write its JSON; 0 on success.

    Args:
        argv: the command line without the program name (default: sys.argv[1:]); `--help` lists the options:
            --layers, --hidden, --heads, --intermediate, --vocab (the model's shape), --batch, --seq, --new-tokens,
            --adapters, --kinds, --heads-per-adapter, --rounds, --dtype, --backend; --device, --threads, --output.
    """
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                 vocab=args.vocab)
    model = build_model(**shape, device=device, dtype=DTYPES[dtype_name])
    rows = run_multi_adapter_benchmark(model, args.kinds, args.adapters, args.batch, args.seq, args.new_tokens,
                                       args.heads_per_adapter, args.rounds, args.backend)
    result = dict(**run_header(device), dtype=dtype_name, model=shape,
                  settings=dict(batch=args.batch, seq=args.seq, new_tokens=args.new_tokens,
                                heads_per_adapter=args.heads_per_adapter, rounds=args.rounds, backend=args.backend),
                  rows=rows)
    path = output_path(args.output, result["device"], result["date"], prefix="multi-adapter-")
    print(f"device: {result['device']}, {dtype_name}, model {shape}, heads per adapter {args.heads_per_adapter}")
    print(format_table(rows))
    write_results(result, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
