"""The `lofit` command: select, tune, eval, merge, export, bench, demo.

    lofit select --model PATH --task clutrr --data train.json --output-dir out/select
    lofit tune   --model PATH --task clutrr --data train.json --ranking out/select/ranking.json --k 32 \
                 --output-dir out/adapter
    lofit eval   --model PATH --task clutrr --data test.json --adapter out/adapter
    lofit merge  --model PATH --adapter out/adapter --output-dir out/merged [--for vllm]
    lofit export --model PATH --adapter out/adapter --format peft-lora --output-dir out/adapter-lora
    lofit bench  [--e2e | --static] [benchmark options]
    lofit demo
    lofit compare [--model PATH --task sft --data train.jsonl --eval-data test.jsonl]

Errors are reported as one line (`lofit: error: ...`) with exit status 2; `--traceback` shows the rest.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings

from .data import (
    PREFERENCE_TASKS,
    TASK_ALIASES,
    TASKS,
    PreferenceCollator,
    SFTCollator,
    canonical_task,
    load_task,
    tokenize_preference,
    tokenize_sft,
)
from .ranking import LOCALIZERS, HeadRanking, resolve_k
from .serving import ENGINES
from .settings import PAPER_SETTINGS_BY_MODEL, paper_settings

# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_model(name_or_path: str, load_in_8bit: bool = False, load_in_4bit: bool = False, dtype: str = "auto",
               with_tokenizer: bool = True, training: bool = False):
    """A causal LM and its tokenizer (None unless `with_tokenizer`) from a local path or a hub name, optionally
    quantized by bitsandbytes.

    dtype "auto" is the checkpoint's own, except that a float16 checkpoint loaded for `training` loads in float32:
    float16 training without loss scaling loses small gradients (the paper trains in fp32 or bf16).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

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
    try:
        config = AutoConfig.from_pretrained(name_or_path)  # read once, handed to from_pretrained below
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a model from {name_or_path!r}: {_one_line(error)}") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if training and dtype == "auto" and _declared_dtype(config) == torch.float16:
        print("lofit: note: the checkpoint is float16, which would train without loss scaling; lofit loads it in "
              "float32 (--dtype bfloat16 takes half the memory, as the paper uses for Llama 2-13B and Gemma-7B)",
              file=sys.stderr)
        torch_dtype = torch.float32
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
        tokenizer = AutoTokenizer.from_pretrained(name_or_path) if with_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a model from {name_or_path!r}: {_one_line(error)}") from None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _declared_dtype(config):
    """The dtype a checkpoint's config declares (a torch.dtype), or None."""
    import torch

    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, declared, None) if isinstance(declared, str) else declared


def _fields(args) -> dict:
    """--prompt-field and the like: {the task's field: the data's column}."""
    return {name: getattr(args, f"{name}_field") for name in DATA_FIELDS if getattr(args, f"{name}_field", None)}


def _examples(args) -> list:
    """The task's examples (--data, --split, --*-field), read before the model so that bad data fails fast."""
    return load_task(args.task, args.data, fields=_fields(args), split=args.split)


def _dataset(args, examples: list, tokenizer):
    """Tokenized training rows and the collator that batches them."""
    if args.task in PREFERENCE_TASKS:
        rows = [tokenize_preference(example, tokenizer, args.max_length, chat_template=args.chat_template)
                for example in examples]
        return rows, PreferenceCollator(tokenizer.pad_token_id), "dpo"
    rows = [tokenize_sft(example, tokenizer, args.max_length, chat_template=args.chat_template)
            for example in examples]
    return rows, SFTCollator(tokenizer.pad_token_id), "sft"


def _settings(args, step: str, model):
    """(the step's settings, the default K): the paper's for the task and the model (or --paper-model), with
    the options given on the command line; printed, as they are also saved with the results."""
    settings = paper_settings(args.task, model=model, paper_model=args.paper_model)
    chosen = settings[step]
    for name in ("learning_rate", "l1_lambda", "num_train_epochs", "per_device_train_batch_size", "seed",
                 "train_size"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(chosen, name, value)
    print(f"settings: {chosen.source}: learning_rate {chosen.learning_rate:g}, l1_lambda {chosen.l1_lambda:g}, "
          f"{chosen.num_train_epochs:g} epochs, batch {chosen.per_device_train_batch_size}, "
          f"train_size {chosen.train_size or 'all'}, seed {chosen.seed}")
    return chosen, settings["k"]


def _training_args(args) -> dict:
    overrides = {}
    if args.gradient_accumulation_steps:
        overrides["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if args.bf16:
        overrides["bf16"] = True
    if args.fp16:
        overrides["fp16"] = True
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

    examples = _examples(args)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype, training=True)
    rows, collator, loss = _dataset(args, examples, tokenizer)
    settings, default_k = _settings(args, "select", model)
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
    from .training import tune

    # Arguments and files first: a mistake there should not wait for the model to load.
    if (args.ranking is None) == (args.heads is None):
        raise ValueError("give one of --ranking PATH (from `lofit select`) and --heads 'layer:head,...'")
    if args.heads and args.k is not None:
        raise ValueError("--k picks the top heads of --ranking; with --heads, the heads are the ones listed")
    ranking = HeadRanking.load(args.ranking) if args.ranking else None
    if ranking and args.k is not None:
        _head_count(args.k, None, len(ranking.ranking))
    heads = _parse_heads(args.heads) if args.heads else None
    examples = _examples(args)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype, training=True)
    rows, collator, loss = _dataset(args, examples, tokenizer)
    settings, default_k = _settings(args, "tune", model)  # the paper's K depends on the model
    k = _head_count(args.k, default_k, len(ranking.ranking)) if ranking else None
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    handle = tune(model, rows, collator, heads=heads, ranking=ranking, k=k, loss=loss,
                  settings=settings, output_dir=checkpoints,
                  training_args=_training_args(args), backend=args.backend,
                  resume_from_checkpoint=args.resume_from_checkpoint)
    handle.save_pretrained(args.output_dir)
    with contextlib.suppress(OSError):  # Trainer makes the folder even when it saves no checkpoint
        os.rmdir(checkpoints)
    print(f"adapter: {args.output_dir} ({len(handle.heads)} heads)")


def _head_count(k, default_k, total_heads: int) -> int:
    """--k as a number of heads (checked against the model); without --k, the paper's K, at most every head."""
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
    from .evaluation import evaluate_examples, evaluation_examples

    examples = evaluation_examples(args.task, args.data, fields=_fields(args), split=args.split)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype)
    if args.adapter:
        load_adapter(model, args.adapter, backend=args.backend, trainable=False)
    model.eval()
    result = evaluate_examples(model, tokenizer, args.task, examples, args.max_new_tokens, args.batch_size,
                               chat_template=args.chat_template,
                               mc_prompt="zero-shot" if args.zero_shot else "qa-primer")
    print(json.dumps(result, indent=1))


def cmd_merge(args):
    from .adapter import load_adapter

    if args.load_in_8bit or args.load_in_4bit:
        print("lofit: note: merging into a quantized base folds offsets into o_proj's bias; "
              "scales cannot be folded into quantized weights", file=sys.stderr)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype)
    handle = load_adapter(model, args.adapter, backend=args.backend, trainable=False)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        merged = handle.merge_and_unload(args.engine)
    for note in notes:
        print(f"lofit: note: {note.message}", file=sys.stderr)
    merged.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"merged model for {args.engine}: {args.output_dir}")


EXPORT_FORMATS = ("peft-lora",)


def cmd_export(args):
    from .adapter import load_adapter

    model, _ = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype, with_tokenizer=False)
    handle = load_adapter(model, args.adapter, backend=args.backend, trainable=False)
    handle.export_peft_lora(args.output_dir)
    print(f"PEFT LoRA adapter: {args.output_dir} (load it with peft.PeftModel.from_pretrained(base_model, "
          f"{args.output_dir!r}))")


def cmd_bench(args, extra):
    if args.e2e and args.static:
        raise ValueError("lofit bench takes --e2e or --static, not both")
    if args.e2e:
        from .bench.e2e import main as bench_main
    elif args.static:
        from .bench.static import main as bench_main
    else:
        from .bench.kernels import main as bench_main
    return bench_main(extra)


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)


# Options of `lofit compare` that only a comparison on your model (--model) reads.
COMPARE_MODEL_OPTIONS = ("task", "data", "eval_data", "k", "methods", "lora_lr", "ia3_lr", "learning_rate",
                         "select_lr", "l1_lambda", "num_train_epochs", "per_device_train_batch_size", "train_size",
                         "paper_model")


def cmd_compare(args):
    from . import compare

    if args.model is None:
        given = [name for name in COMPARE_MODEL_OPTIONS if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an option of a comparison on your model: give "
                             f"--model PATH (with --task, --data and --eval-data), or leave it out for the demo's")
        comparison = compare.QUICK if args.quick else compare.FULL
        if args.seeds:
            comparison = dataclasses.replace(comparison, seeds=tuple(args.seeds))
        workers = compare.default_workers() if args.workers is None else args.workers
        compare.run_demo_comparison(args.output_dir, quick=args.quick, workers=workers, comparison=comparison)
        return
    missing = [option for option, value in (("--task", args.task), ("--data", args.data),
                                            ("--eval-data", args.eval_data)) if value is None]
    if missing:
        raise ValueError(f"a comparison on your model needs {', '.join(missing)} (the training data, and the "
                         f"held-out data it is scored on)")
    if args.task in PREFERENCE_TASKS:
        raise ValueError(f"lofit compare trains LoRA and IA3 with the SFT loss only, so it takes an SFT task "
                         f"(clutrr, mquake, sft), not {args.task}")
    if args.quick or args.workers is not None:
        raise ValueError("--quick and --workers are options of the demo's comparison (without --model)")
    from .evaluation import evaluation_examples
    from .patch import attention_shape

    examples = _examples(args)
    eval_examples = evaluation_examples(args.task, args.eval_data, fields=_fields(args), split=args.eval_split)
    model, tokenizer = load_model(args.model, args.load_in_8bit, args.load_in_4bit, args.dtype, training=True)
    rows, collator, _ = _dataset(args, examples, tokenizer)
    # --lr is step 2's (the rate LoRA's is compared with), --select-lr step 1's; the seed is each run's.
    select, default_k = _settings(argparse.Namespace(**{**vars(args), "learning_rate": args.select_lr}), "select",
                                  model)
    tune, _ = _settings(argparse.Namespace(**{**vars(args), "l1_lambda": None}), "tune", model)
    shape = attention_shape(model)
    head_counts = args.k or [_head_count(None, default_k, shape.num_layers * shape.num_heads)]
    given = {"seeds": args.seeds, "families": args.methods, "lora_ranks": args.lora_ranks, "lora_lr": args.lora_lr,
             "ia3_lr": args.ia3_lr}  # the others keep compare_on_model's defaults
    compare.compare_on_model(
        model, tokenizer, rows, collator, eval_examples, task=args.task, select_settings=select, tune_settings=tune,
        head_counts=head_counts, output_dir=args.output_dir, training_args={"bf16": True} if args.bf16 else None,
        backend=args.backend, max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
        chat_template=args.chat_template, **{name: value for name, value in given.items() if value is not None})


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------

# The fields of sft / dpo data that --<name>-field renames.
DATA_FIELDS = ("prompt", "completion", "chosen", "rejected")


def _add_model_arguments(parser, task_required=True, data_required=True, model_required=True):
    parser.add_argument("--model", required=model_required, help="local path or hub name of a causal LM")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-in-8bit", action="store_true", help="quantize the base with bitsandbytes LLM.int8")
    group.add_argument("--load-in-4bit", action="store_true", help="quantize the base with bitsandbytes NF4")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    if task_required is not None:
        parser.add_argument("--task", required=task_required, choices=TASKS + tuple(TASK_ALIASES),
                            help="sft / dpo: your own data (sft-jsonl / dpo-jsonl: their earlier names)")
    if data_required is not None:
        parser.add_argument("--data", required=data_required,
                            help="the task's data: a JSON-lines, JSON, CSV or parquet file, a directory written by "
                                 "datasets' save_to_disk, or a Hugging Face Hub dataset name")
        parser.add_argument("--split", help="the split of a save_to_disk DatasetDict or a Hub dataset (Hub: train)")
        for name in DATA_FIELDS:
            parser.add_argument(f"--{name}-field", help=f"the data's column that holds the {name} (sft / dpo)")
        parser.add_argument("--chat-template", action="store_true",
                            help="put each prompt in the tokenizer's chat template (loss still on the answer only)")


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
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    precision.add_argument("--fp16", action="store_true", help="fp16 mixed precision with loss scaling (GPU)")
    parser.add_argument("--save-steps", type=int, help="write a checkpoint (adapter and optimizer state) every N steps")
    parser.add_argument("--train-size", dest="train_size", type=int,
                        help="train on a seeded random subset of this many examples, 0 for all (default: the "
                             "paper's: 300 for clutrr, all for the other tasks)")
    parser.add_argument("--paper-model", choices=tuple(PAPER_SETTINGS_BY_MODEL),
                        help="use the paper's settings for this model (default: the one with the model's shape, "
                             "else llama-2-7b)")


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
    evaluate.add_argument("--zero-shot", action="store_true",
                          help="TruthfulQA: score answers after the question alone, not TruthfulQA's six-shot QA "
                               "primer (the paper's and TruthfulQA's default)")

    merge = commands.add_parser("merge", help="fold an adapter into the base and save the plain model")
    _add_model_arguments(merge, task_required=None, data_required=None)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output-dir", required=True)
    merge.add_argument("--for", dest="engine", default="transformers", choices=ENGINES,
                       help="the engine that will load the merged model: the offsets become o_proj biases, which "
                            "only some engines build for some architectures; refused where they would be dropped")

    export = commands.add_parser("export", help="write an adapter in another library's format")
    _add_model_arguments(export, task_required=None, data_required=None)
    export.add_argument("--adapter", required=True, help="adapter directory written by `lofit tune`")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="peft-lora: a PEFT LoRA adapter of o_proj that stock PeftModel.from_pretrained loads")
    export.add_argument("--output-dir", required=True)

    bench = commands.add_parser("bench", help="kernel microbenchmark (or --e2e: training-step benchmark; --static: "
                                              "compiled-code report and bandwidth prediction for a GPU target)",
                                add_help=False)
    bench.add_argument("--e2e", action="store_true")
    bench.add_argument("--static", action="store_true")

    demo = commands.add_parser("demo", help="the whole method on a built-in task and model, on CPU")
    demo.add_argument("--output-dir", default="lofit_demo")
    demo.add_argument("--quick", action="store_true", help="a much smaller budget (a smoke run)")
    demo.add_argument("--seed", type=int, default=0)

    from .bench.common import comma_list
    from .compare import FAMILIES

    compare = commands.add_parser(
        "compare", help="LoFiT against random and probed heads, LoRA and IA3, with parameter counts, over seeds: "
                        "on the demo's task (default, CPU) or on your model (--model)")
    _add_model_arguments(compare, task_required=False, data_required=False, model_required=False)
    compare.add_argument("--eval-data", help="your model: the held-out data the rows are scored on (exact match)")
    compare.add_argument("--eval-split", help="the split of --eval-data, as --split")
    compare.add_argument("--output-dir", default="lofit_compare", help="where compare.json and compare.png go")
    compare.add_argument("--seeds", type=comma_list(convert=int),
                         help="seeds, e.g. 0,1,2 (default: 0,1,2; --quick: 0,1)")
    compare.add_argument("--quick", action="store_true", help="the demo's comparison on a much smaller budget (smoke)")
    compare.add_argument("--workers", type=int,
                         help="the demo's comparison: processes running its jobs, one thread each (default: the "
                              "cores, at most 2)")
    compare.add_argument("--methods", type=comma_list(valid=FAMILIES),
                         help=f"your model: rows among {', '.join(FAMILIES)} (default: lofit,random,lora-o_proj,"
                              f"lora-qv)")
    compare.add_argument("--k", type=comma_list(convert=_parse_k),
                         help="your model: K of the head rows, counts or fractions of all heads, e.g. 0.01,0.03,0.1 "
                              "(default: the paper's K)")
    compare.add_argument("--lora-ranks", type=comma_list(convert=int), help="your model: LoRA ranks (default: 1,2,8)")
    compare.add_argument("--lora-lr", type=float, help="your model: LoRA's learning rate (default: 2e-4)")
    compare.add_argument("--ia3-lr", type=float, help="your model: IA3's learning rate (default: 3e-3)")
    compare.add_argument("--lr", dest="learning_rate", type=float, help="your model: step 2's learning rate "
                                                                         "(default: the paper's)")
    compare.add_argument("--select-lr", type=float, help="your model: step 1's learning rate (default: the paper's)")
    compare.add_argument("--l1-lambda", dest="l1_lambda", type=float)
    compare.add_argument("--epochs", dest="num_train_epochs", type=float, help="every row's epochs (default: the "
                                                                                 "paper's)")
    compare.add_argument("--batch-size", dest="per_device_train_batch_size", type=int)
    compare.add_argument("--train-size", dest="train_size", type=int)
    compare.add_argument("--paper-model", choices=tuple(PAPER_SETTINGS_BY_MODEL))
    compare.add_argument("--max-length", type=int, default=512)
    compare.add_argument("--max-new-tokens", type=int, default=16)
    compare.add_argument("--eval-batch-size", type=int, default=16)
    compare.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    return parser


def main(argv=None) -> int:
    from .bnb import drop_optional_kernel_notice

    drop_optional_kernel_notice()  # it would land in the middle of the commands' output
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "task", None):
        args.task = canonical_task(args.task)  # "sft-jsonl" / "dpo-jsonl": the earlier names of "sft" / "dpo"
    commands = {"select": cmd_select, "tune": cmd_tune, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export,
                "demo": cmd_demo, "compare": cmd_compare}
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
