"""The `lofit` command: select, tune, eval, merge, bench, demo.

    lofit select --model PATH --task clutrr --data train.json --output-dir out/select
    lofit tune   --model PATH --task clutrr --data train.json --ranking out/select/ranking.json --k 32 --output-dir out/adapter
    lofit eval   --model PATH --task clutrr --data test.json --adapter out/adapter
    lofit merge  --model PATH --adapter out/adapter --output-dir out/merged
    lofit bench  [--e2e] [benchmark options]
    lofit demo

Errors are reported as one line (`lofit: error: ...`) with exit status 2; `--traceback` shows the rest.
"""

import argparse
import contextlib
import json
import os
import sys

TASKS = ("clutrr", "mquake", "truthfulqa", "sft-jsonl", "dpo-jsonl")
PREFERENCE_TASKS = ("truthfulqa", "dpo-jsonl")
LOCALIZERS = ("lofit", "random", "probe")  # training.LOCALIZERS, copied so that parsing imports no Trainer


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_model(name_or_path: str, load_in_8bit: bool = False, load_in_4bit: bool = False, dtype: str = "auto"):
    """A causal LM and its tokenizer from a local path or a hub name, optionally quantized by bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of --load-in-8bit and --load-in-4bit")
    # Hub names look like "owner/name"; a path that is absolute or starts with . or ~ is meant to be local,
    # and the hub client would only say that it is not a valid repository id.
    if name_or_path.startswith((os.sep, ".", "~")) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"no model directory at {name_or_path} (give a directory written by "
                                f"save_pretrained, or a hub name such as meta-llama/Llama-2-7b-hf)")
    name_or_path = os.path.expanduser(name_or_path)
    if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise FileNotFoundError(f"{name_or_path} has no config.json: give a model directory written by "
                                f"save_pretrained (an adapter directory goes to --adapter)")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif load_in_4bit:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=compute_dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a model from {name_or_path!r}: {_one_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _examples(task: str, path: str) -> list:
    """The task's examples, read before the model so that a bad data file fails fast."""
    from .data import load_task

    return load_task(task, path)


def _dataset(task: str, examples: list, tokenizer, max_length: int):
    """Tokenized training rows and the collator that batches them."""
    from .data import PreferenceCollator, SFTCollator, tokenize_preference, tokenize_sft

    if task in PREFERENCE_TASKS:
        rows = [tokenize_preference(example, tokenizer, max_length) for example in examples]
        return rows, PreferenceCollator(tokenizer.pad_token_id), "dpo"
    rows = [tokenize_sft(example, tokenizer, max_length) for example in examples]
    return rows, SFTCollator(tokenizer.pad_token_id), "sft"


def _settings(args, step: str):
    from .training import paper_settings

    settings = paper_settings(args.task)
    chosen = settings[step]
    for name in ("learning_rate", "l1_lambda", "num_train_epochs", "per_device_train_batch_size", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(chosen, name, value)
    return chosen, settings["k"]


def _training_args(args) -> dict:
    overrides = {}
    if args.gradient_accumulation_steps:
        overrides["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if args.bf16:
        overrides["bf16"] = True
    if args.gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
        overrides["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if args.save_steps:
        overrides.update(save_strategy="steps", save_steps=args.save_steps)
    return overrides


def _parse_k(text: str):
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------

def cmd_select(args):
    from .heatmap import plot_head_scores
    from .patch import attention_shape
    from .training import select_heads

    examples = _examples(args.task, args.data)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype)
    rows, collator, loss = _dataset(args.task, examples, tokenizer, args.max_length)
    settings, default_k = _settings(args, "select")
    shape = attention_shape(model)
    k = _head_count(args.k, default_k, shape.num_layers * shape.num_heads)  # checked before training
    ranking = select_heads(model, rows, collator, loss=loss, settings=settings, localizer=args.localizer,
                           output_dir=args.output_dir, training_args=_training_args(args), backend=args.backend)
    heatmap = os.path.join(args.output_dir, "heads.png")
    plot_head_scores(ranking, heatmap, selected_k=k)
    print(f"ranking: {os.path.join(args.output_dir, 'ranking.json')}")
    print(f"heatmap: {heatmap}")
    for layer, head, score in ranking.ranking[:10]:
        print(f"  layer {layer:3d} head {head:3d}  score {score if score is None else round(score, 5)}")


def cmd_tune(args):
    from .training import HeadRanking, tune

    # Arguments and files first: a mistake there should not wait for the model to load.
    if (args.ranking is None) == (args.heads is None):
        raise ValueError("give one of --ranking PATH (from `lofit select`) and --heads 'layer:head,...'")
    if args.heads and args.k is not None:
        raise ValueError("--k picks the top heads of --ranking; with --heads, the heads are the ones listed")
    settings, default_k = _settings(args, "tune")
    ranking = HeadRanking.load(args.ranking) if args.ranking else None
    k = _head_count(args.k, default_k, len(ranking.ranking)) if ranking else None
    heads = _parse_heads(args.heads) if args.heads else None
    examples = _examples(args.task, args.data)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype)
    rows, collator, loss = _dataset(args.task, examples, tokenizer, args.max_length)
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    handle = tune(model, rows, collator, heads=heads, ranking=ranking, k=k, loss=loss,
                  settings=settings, output_dir=checkpoints,
                  training_args=_training_args(args), backend=args.backend,
                  resume_from_checkpoint=args.resume_from_checkpoint)
    handle.save_pretrained(args.output_dir)
    with contextlib.suppress(OSError):  # Trainer makes the folder even when it saves no checkpoint
        os.rmdir(checkpoints)
    print(f"adapter: {args.output_dir} ({len(handle.heads)} heads)")


def _head_count(k, default_k: int, total_heads: int) -> int:
    """--k as a number of heads (checked against the model); without --k, the paper's K, at most every head."""
    from .training import resolve_k

    return resolve_k(k, total_heads) if k is not None else min(default_k, total_heads)


def _parse_heads(text: str) -> list:
    """'3:7,10:2' -> [(3, 7), (10, 2)]."""
    heads = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"--heads {text!r}: {item.strip()!r} is not a layer:head pair; write heads as "
                             f"layer:head pairs separated by commas, e.g. 3:7,10:2")
        heads.append((int(parts[0]), int(parts[1])))
    return heads


def cmd_eval(args):
    from .adapter import load_adapter

    examples = evaluation_examples(args.task, args.data)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype)
    if args.adapter:
        load_adapter(model, args.adapter, backend=args.backend, trainable=False)
    model.eval()
    result = evaluate_examples(model, tokenizer, args.task, examples, args.max_new_tokens, args.batch_size)
    print(json.dumps(result, indent=1))


def evaluation_examples(task: str, path: str) -> list:
    """What `lofit eval` scores: TruthfulQA's multiple-choice questions, or a task's generation examples."""
    from .data import load_task, load_truthfulqa_mc

    if task == "truthfulqa":
        return load_truthfulqa_mc(path)
    if task == "dpo-jsonl":
        raise ValueError("--task dpo-jsonl has no generation answers to score; evaluate with an sft-jsonl file")
    return load_task(task, path)


def evaluate_examples(model, tokenizer, task: str, examples: list, max_new_tokens: int = 16,
                      batch_size: int = 16) -> dict:
    """TruthfulQA: {"mc1", "mc2", "examples"} from answer log-likelihoods; other tasks:
    {"exact_match", "examples"} from greedy generation."""
    from .evaluation import evaluate_generation, truthfulqa_mc_scores

    if task == "truthfulqa":
        return truthfulqa_mc_scores(model, tokenizer, examples, batch_size=batch_size)
    return {"exact_match": evaluate_generation(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size), "examples": len(examples)}


def cmd_merge(args):
    from .adapter import load_adapter

    if args.load_in_8bit or args.load_in_4bit:
        print("lofit: note: merging into a quantized base folds offsets into o_proj's bias; "
              "scales cannot be folded into quantized weights", file=sys.stderr)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype)
    handle = load_adapter(model, args.adapter, backend=args.backend, trainable=False)
    merged = handle.merge_and_unload()
    merged.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"merged model: {args.output_dir}")


def cmd_bench(args, extra):
    if args.e2e:
        from .benchmark_e2e import main as bench_main
    else:
        from .benchmark import main as bench_main
    return bench_main(extra)


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------

def _add_model_arguments(parser, task_required=True, data_required=True):
    parser.add_argument("--model", required=True, help="local path or hub name of a causal LM")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-in-8bit", action="store_true", help="quantize the base with bitsandbytes LLM.int8")
    group.add_argument("--load-in-4bit", action="store_true", help="quantize the base with bitsandbytes NF4")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    if task_required is not None:
        parser.add_argument("--task", required=task_required, choices=TASKS)
    if data_required is not None:
        parser.add_argument("--data", required=data_required, help="the task's data file")


def _add_training_arguments(parser):
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--lr", dest="learning_rate", type=float, help="learning rate (default: the paper's)")
    parser.add_argument("--epochs", dest="num_train_epochs", type=float)
    parser.add_argument("--batch-size", dest="per_device_train_batch_size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--k", type=_parse_k, help="heads to tune: a count, or a fraction of all heads")
    parser.add_argument("--gradient-accumulation-steps", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--save-steps", type=int, help="write a checkpoint every N steps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit", description="LoFiT fine-tuning with fused kernels.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    select = commands.add_parser("select", help="step 1: rank attention heads for a task")
    _add_model_arguments(select)
    _add_training_arguments(select)
    select.add_argument("--localizer", default="lofit", choices=LOCALIZERS,
                        help="lofit: train a scale on every head, score ||A||_2 (the paper's step 1); random: a "
                             "seeded order; probe: a linear probe's validation accuracy per head, ITI-style (uses "
                             "only --batch-size and --seed; nothing is trained in the model)")
    select.add_argument("--l1-lambda", dest="l1_lambda", type=float)

    tune = commands.add_parser("tune", help="step 2: learn offsets on the top-K heads")
    _add_model_arguments(tune)
    _add_training_arguments(tune)
    tune.add_argument("--ranking", help="ranking.json written by `lofit select`")
    tune.add_argument("--heads", help="explicit heads instead of a ranking, e.g. 3:7,10:2")
    tune.add_argument("--resume-from-checkpoint", help="a Trainer checkpoint directory to resume from")

    evaluate = commands.add_parser("eval", help="score a model (with an adapter) on a task")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--adapter", help="adapter directory written by `lofit tune`")
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.add_argument("--batch-size", type=int, default=16)

    merge = commands.add_parser("merge", help="fold an adapter into the base and save the plain model")
    _add_model_arguments(merge, task_required=None, data_required=None)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output-dir", required=True)

    bench = commands.add_parser("bench", help="kernel microbenchmark (or --e2e: training-step benchmark)",
                                add_help=False)
    bench.add_argument("--e2e", action="store_true")

    demo = commands.add_parser("demo", help="the whole method on a built-in task and model, on CPU")
    demo.add_argument("--output-dir", default="lofit_demo")
    demo.add_argument("--quick", action="store_true", help="a much smaller budget (a smoke run)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    from .bnb import drop_optional_kernel_notice

    drop_optional_kernel_notice()  # it would land in the middle of the commands' output
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"select": cmd_select, "tune": cmd_tune, "eval": cmd_eval, "merge": cmd_merge, "demo": cmd_demo}
    try:
        if args.command == "bench":
            return cmd_bench(args, extra) or 0
        commands[args.command](args)
        return 0
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError) as error:
        if args.traceback:
            raise
        print(f"lofit: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The error's message on one line (libraries' messages can span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
