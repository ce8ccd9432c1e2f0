"""`run_demo`: the whole LoFiT method on a built-in task and a tiny model, on the CPU, in minutes.

A tiny Llama is pretrained once (cached) to answer the item of a list that an instruction word asks for (first,
last, second, penultimate; three words each). The new task teaches an unseen word, "final", to mean "last":
step 1 (`select_heads`) ranks the heads, step 2 (`tune`) trains offsets on the top-K heads and, for several seeds,
on K random heads, and the demo prints held-out accuracy of the base, LoFiT's heads and the random heads, and
how far the top step-1 scores stand above the median (a flat ranking means step 1 did not localize). README.md
("The demo") tells the design. `adaptation_data(settings, seed, means=...)` builds the same task for any of the
base's skills, for `lofit compare`.
"""

import contextlib
import hashlib
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .io import atomic_path, atomic_write_text
from .settings import StepSettings

# Bump when the task, the vocabulary or the pretraining recipe changes: it invalidates cached bases.
DEMO_VERSION = 1

PAD, UNKNOWN, ANSWER_MARK = "<pad>", "<unk>", "="
# Each skill: the index of the item it answers, and its instruction words. In a first design with one
# word per skill, whether constant offsets could redirect the new word depended on the base model's
# random initialisation (with one seed not even offsets on all 96 heads could); synonyms make the
# instruction a shared internal direction that offsets can reach, for every base seed tried.
SKILLS = {"first": (0, ("first", "initial", "leading")), "last": (-1, ("last", "end", "closing")),
          "second": (1, ("second", "2nd", "runner-up")),
          "penultimate": (-2, ("penultimate", "second-last", "next-to-last"))}
INSTRUCTION_POSITIONS = {word: position for position, words in SKILLS.values() for word in words}
# The new word's target: "last" is one of the two instructions that an unseen word already half
# evokes in these models (the other is "first"); "second" and "penultimate" could not be reached by
# offsets at all in trials, so they cannot show which heads matter.
NEW_WORD, NEW_WORD_MEANS = "final", "last"
PRETRAINING_SEED = 0  # the base model is the same for every demo seed; the seed varies the LoFiT part
EVAL_SEED = 12345


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sizes the demo. FULL is the real demo; QUICK a smoke run for tests."""

    # model and task
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    num_items: int  # size of the item vocabulary
    list_length: int
    # pretraining (the base model)
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_lr: float
    # adaptation
    train_examples: int
    eval_examples: int
    batch_size: int
    select_steps: int
    select_lr: float
    l1_lambda: float
    k: int
    tune_steps: int
    tune_lr: float
    random_runs: int

    def base_fields(self) -> dict:
        """The fields that determine the pretrained base (its cache key)."""
        names = ("num_layers", "num_heads", "head_dim", "hidden_size", "num_items", "list_length",
                 "pretrain_steps", "pretrain_batch_size", "pretrain_lr")
        return {name: getattr(self, name) for name in names}


# Many narrow heads (96 heads of 8 dims over a 128-wide stream): each head reaches only a small part
# of the residual stream, so which heads get the offsets matters. A strong L1 separates the scores.
# K = 3 is 3% of the heads, the share the paper uses (K = 32 of Llama 2-7B's 1,024).
FULL = DemoSettings(num_layers=6, num_heads=16, head_dim=8, hidden_size=128, num_items=32, list_length=6,
                    pretrain_steps=600, pretrain_batch_size=64, pretrain_lr=3e-3,
                    train_examples=256, eval_examples=2000, batch_size=32,
                    select_steps=200, select_lr=5e-3, l1_lambda=1e-2,
                    k=3, tune_steps=200, tune_lr=3e-2, random_runs=5)
QUICK = DemoSettings(num_layers=2, num_heads=4, head_dim=8, hidden_size=32, num_items=8, list_length=4,
                     pretrain_steps=150, pretrain_batch_size=32, pretrain_lr=5e-3,
                     train_examples=64, eval_examples=200, batch_size=16,
                     select_steps=16, select_lr=5e-3, l1_lambda=1e-2,
                     k=2, tune_steps=16, tune_lr=3e-2, random_runs=2)


# ----------------------------------------------------------------------------------------------
# The task: pick an item from a list
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ListExample:
    prompt: str  # "<instruction> <item> ... <item> ="
    answer: str  # one item


def item_words(settings: DemoSettings) -> list[str]:
    return [f"w{i}" for i in range(settings.num_items)]


def vocabulary(settings: DemoSettings) -> list[str]:
    """Every word the tokenizer knows. NEW_WORD is in it from the start, but no pretraining example
    uses it, so the base model has never seen it (its embedding keeps its random initialisation)."""
    return [PAD, UNKNOWN, ANSWER_MARK, *INSTRUCTION_POSITIONS, NEW_WORD, *item_words(settings)]


def make_examples(instruction: str, count: int, rng: random.Random, settings: DemoSettings,
                  exclude: frozenset = frozenset(), means: Optional[str] = None) -> list[ListExample]:
    """`count` prompts for `instruction` (an instruction word or NEW_WORD), each a list of distinct items;
    the answer is the item the instruction names, so it is correct by construction. `means` is the skill
    (a key of SKILLS) the instruction stands for: by default its own, and NEW_WORD_MEANS for NEW_WORD. Prompts
    in `exclude` are skipped (to keep training and held-out data apart)."""
    if means is None and instruction == NEW_WORD:
        means = NEW_WORD_MEANS
    position = SKILLS[means][0] if means else INSTRUCTION_POSITIONS[instruction]
    words = item_words(settings)
    examples = []
    while len(examples) < count:
        items = rng.sample(words, settings.list_length)
        prompt = " ".join([instruction, *items, ANSWER_MARK])
        if prompt not in exclude:
            examples.append(ListExample(prompt, items[position]))
    return examples


def adaptation_data(settings: DemoSettings, seed: int, means: str = NEW_WORD_MEANS) -> tuple[list, list]:
    """(training examples, held-out examples) of the task "NEW_WORD means `means`". The held-out prompts are
    the same for every seed (drawn with EVAL_SEED); `seed` draws the training prompts, none of them held out."""
    held_out = make_examples(NEW_WORD, settings.eval_examples, random.Random(EVAL_SEED), settings, means=means)
    train = make_examples(NEW_WORD, settings.train_examples, random.Random(seed), settings,
                          exclude=frozenset(example.prompt for example in held_out), means=means)
    return train, held_out


def build_tokenizer(settings: DemoSettings):
    """A word-level `PreTrainedTokenizerFast` over the demo's vocabulary: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary(settings)
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNKNOWN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNKNOWN)


def encode(examples: list[ListExample], tokenizer) -> list[dict]:
    """SFT rows: prompt + answer token, with the loss on the answer only (labels -100 elsewhere)."""
    prompts = tokenizer([example.prompt for example in examples])["input_ids"]
    answers = tokenizer.convert_tokens_to_ids([example.answer for example in examples])
    rows = []
    for prompt, answer in zip(prompts, answers):
        input_ids = torch.tensor([*prompt, answer])
        labels = torch.full_like(input_ids, -100)
        labels[-1] = answer
        rows.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return rows


def collate(rows: list[dict]) -> dict:
    """Every prompt of the task has the same length, so a batch is a plain stack."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


@torch.no_grad()
def next_token_accuracy(model, examples: list[ListExample], tokenizer, batch_size: int = 500) -> float:
    """Share of prompts whose most likely next token is the answer (answers are single tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = torch.tensor(tokenizer([example.prompt for example in examples])["input_ids"], device=device)
    answers = torch.tensor(tokenizer.convert_tokens_to_ids([example.answer for example in examples]), device=device)
    correct = 0
    for start in range(0, len(examples), batch_size):
        logits = model(input_ids=prompts[start:start + batch_size]).logits[:, -1]
        correct += (logits.argmax(-1) == answers[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(examples)


# ----------------------------------------------------------------------------------------------
# The base model: pretrained once, cached
# ----------------------------------------------------------------------------------------------

def cache_dir() -> str:
    """$LOFIT_CACHE, else $XDG_CACHE_HOME/lofit_fast, else ~/.cache/lofit_fast."""
    if os.environ.get("LOFIT_CACHE"):
        return os.environ["LOFIT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lofit_fast")


def model_config(settings: DemoSettings):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(vocabulary(settings)), hidden_size=settings.hidden_size,
        intermediate_size=2 * settings.hidden_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_heads,
        head_dim=settings.head_dim, max_position_embeddings=settings.list_length + 4,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    # Eager attention: on sequences of 8 tokens it is as fast as SDPA on the CPU, and deterministic.
    config._attn_implementation = "eager"
    return config


def base_cache_path(settings: DemoSettings) -> str:
    """The cache file of the base model for `settings`, keyed by everything that shapes its weights."""
    key = json.dumps({"demo_version": DEMO_VERSION, "seed": PRETRAINING_SEED, "vocabulary": vocabulary(settings),
                      "skills": SKILLS, **settings.base_fields()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"demo_base_{digest}.safetensors")


def new_model(settings: DemoSettings):
    """A randomly initialised (seeded) model: the starting point of pretraining, and the skeleton that
    cached weights are loaded into."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(PRETRAINING_SEED)
    return LlamaForCausalLM(model_config(settings)).eval()


def pretrain(settings: DemoSettings, tokenizer, log=print):
    """Train a fresh model on the pretraining tasks (plain AdamW loop: this is the base, not LoFiT)."""
    model = new_model(settings)
    rng = random.Random(PRETRAINING_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.pretrain_lr,
                                                   total_steps=settings.pretrain_steps, pct_start=0.1)
    per_word = settings.pretrain_batch_size // len(INSTRUCTION_POSITIONS)
    model.train()
    for step in range(settings.pretrain_steps):
        examples = [example for word in INSTRUCTION_POSITIONS
                    for example in make_examples(word, per_word, rng, settings)]
        loss = model(**collate(encode(examples, tokenizer))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % max(1, settings.pretrain_steps // 4) == 0:
            log(f"  pretraining step {step + 1}/{settings.pretrain_steps}: loss {loss.item():.4f}")
    return model.eval()


def load_or_pretrain_base(settings: DemoSettings, tokenizer, log=print):
    """(model, cache_path, loaded_from_cache). A cache file that cannot be read is rebuilt."""
    import safetensors.torch

    path = base_cache_path(settings)
    if os.path.exists(path):
        model = new_model(settings)
        try:
            model.load_state_dict(safetensors.torch.load_file(path), strict=True)
            return model, path, True
        except Exception as error:  # any unreadable or mismatched file: retrain rather than fail
            log(f"  the cached base model {path} is unreadable ({type(error).__name__}: {error}); rebuilding it")
    model = pretrain(settings, tokenizer, log)
    # Written atomically: a run killed mid-write leaves no half file that a later run would load.
    with atomic_path(path) as temporary:
        safetensors.torch.save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
                                    temporary, metadata={"format": "pt"})
    return model, path, False


# ----------------------------------------------------------------------------------------------
# LoFiT on the new task
# ----------------------------------------------------------------------------------------------

TRAINER_OVERRIDES = {
    # Trainer's per-step logs and bars would bury the demo's own progress lines.
    "disable_tqdm": True, "logging_strategy": "no",
    # The demo is sized for the CPU; a model this small gains nothing from a GPU.
    "use_cpu": True,
}


def trainer_arguments(scratch: str) -> dict:
    """The `training_args` overrides of every demo run: TRAINER_OVERRIDES, and `scratch` as Trainer's output
    directory (Trainer wants one; with saving off nothing lands there)."""
    return {**TRAINER_OVERRIDES, "output_dir": scratch}


@contextlib.contextmanager
def cpu_session(prefix: str):
    """The demo's run environment: one torch thread (the matrices are tiny, and on a busy machine extra threads
    spin and run far slower), put back afterwards; yields a scratch directory for Trainer, removed afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            yield scratch
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet_trainer():
    """Trainer's warnings off while the demo prints its own progress (its printing is off through
    the training arguments: no tqdm, no logging)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _step_settings(settings: DemoSettings, learning_rate: float, steps: int, l1_lambda: float, seed: int):
    return StepSettings(learning_rate=learning_rate, l1_lambda=l1_lambda, seed=seed,
                        num_train_epochs=steps * settings.batch_size / settings.train_examples,
                        per_device_train_batch_size=settings.batch_size)


def select_step_settings(settings: DemoSettings, seed: int) -> StepSettings:
    """Step 1 of the demo: scales on every head with the L1 penalty."""
    return _step_settings(settings, settings.select_lr, settings.select_steps, settings.l1_lambda, seed)


def tune_step_settings(settings: DemoSettings, seed: int, learning_rate: Optional[float] = None) -> StepSettings:
    """Step 2 of the demo (and the PEFT rows of `lofit compare`, at their own `learning_rate`)."""
    return _step_settings(settings, settings.tune_lr if learning_rate is None else learning_rate,
                          settings.tune_steps, 0.0, seed)


def score_spread(ranking, k: int) -> dict:
    """How far the top-K step-1 scores stand above the median score of all heads (ratio None if the
    median is 0)."""
    scores = [score for _, _, score in ranking.ranking]
    median = statistics.median(scores)
    top = scores[:k]
    return {"top_scores": top, "median_score": median,
            "top_k_mean_over_median": statistics.mean(top) / median if median > 0 else None}


def is_localized(spread: dict) -> bool:
    """Top scores within a few times the median give no real choice of heads: step 1 did not localize."""
    ratio = spread["top_k_mean_over_median"]
    return ratio is None or ratio >= 5.0


class Progress:
    """Prints each message with the seconds since the demo started."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


def run_demo(output_dir: str = "lofit_demo", quick: bool = False, seed: int = 0) -> dict:
    """Run the demo and write ranking.json, heads.png, adapter/ and results.json to `output_dir`; returns the
    contents of results.json.

    Args:
        output_dir: where the files go.
        quick: a much smaller budget (a smoke run; the numbers mean little).
        seed: draws the adaptation data, the LoFiT initialisations and the random heads (the base model is the
            same for every seed).
    """
    with cpu_session("lofit_demo_trainer_") as scratch:
        return _run(output_dir, QUICK if quick else FULL, quick, seed, scratch)


def _run(output_dir: str, settings: DemoSettings, quick: bool, seed: int, scratch: str) -> dict:
    from .heatmap import plot_head_scores
    from .training import random_ranking, select_heads, tune
    from .version import __version__

    log = Progress()
    timings = {}
    os.makedirs(output_dir, exist_ok=True)
    tokenizer = build_tokenizer(settings)
    k = settings.k

    # -- the base model and the data -------------------------------------------------------------
    log(f"base model: {settings.num_layers} layers x {settings.num_heads} heads (head_dim {settings.head_dim}), "
        f"hidden {settings.hidden_size}; skills: " + "; ".join(f"{skill} ({', '.join(words)})"
                                                              for skill, (_, words) in SKILLS.items()))
    phase = time.perf_counter()
    model, cache_path, cached = load_or_pretrain_base(settings, tokenizer, log)
    timings["base_model"] = time.perf_counter() - phase
    log(f"base model {'loaded from' if cached else 'pretrained and cached in'} {cache_path}")
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    train_examples, eval_examples = adaptation_data(settings, seed)
    train_rows = encode(train_examples, tokenizer)
    skill_accuracy = {word: next_token_accuracy(model, make_examples(word, settings.eval_examples // 8,
                                                                     random.Random(EVAL_SEED + 1), settings), tokenizer)
                      for word in INSTRUCTION_POSITIONS}
    log("base accuracy on its instruction words: lowest " + ", ".join(
        f"{skill} {min(skill_accuracy[word] for word in words):.2f}" for skill, (_, words) in SKILLS.items()))
    example = train_examples[0]
    log(f"new task: '{NEW_WORD}' means '{NEW_WORD_MEANS}', e.g. \"{example.prompt}\" -> {example.answer}; "
        f"{len(train_examples)} training prompts, {len(eval_examples)} held-out")
    base_accuracy = next_token_accuracy(model, eval_examples, tokenizer)
    log(f"base accuracy on '{NEW_WORD}': {base_accuracy:.3f}")

    # -- step 1: rank the heads ------------------------------------------------------------------
    log(f"step 1: scales on all {settings.num_layers * settings.num_heads} heads, L1 {settings.l1_lambda:g}, "
        f"{settings.select_steps} steps")
    phase = time.perf_counter()
    with quiet_trainer():
        ranking = select_heads(model, train_rows, collate, loss="sft", localizer="lofit", output_dir=output_dir,
                               settings=select_step_settings(settings, seed),
                               training_args=trainer_arguments(scratch), backend="torch")
    timings["step1_select"] = time.perf_counter() - phase
    spread = score_spread(ranking, k)
    log(f"step 1 done in {timings['step1_select']:.1f}s; top-{k} heads {ranking.top(k)}, "
        + _spread_text(spread, k))
    plot_head_scores(ranking, os.path.join(output_dir, "heads.png"), selected_k=k)

    def tune_and_score(tune_ranking):
        """(handle, held-out accuracy) of offsets trained on the top-K heads of `tune_ranking`."""
        with quiet_trainer():
            handle = tune(model, train_rows, collate, ranking=tune_ranking, k=k, loss="sft",
                          settings=tune_step_settings(settings, seed),
                          training_args=trainer_arguments(scratch), backend="torch")
        return handle, next_token_accuracy(model, eval_examples, tokenizer)

    # -- step 2: offsets on the top-K heads ------------------------------------------------------
    log(f"step 2: offsets on the top-{k} heads, {settings.tune_steps} steps, lr {settings.tune_lr:g}")
    phase = time.perf_counter()
    handle, lofit_accuracy = tune_and_score(ranking)
    adapter_dir = os.path.join(output_dir, "adapter")
    handle.save_pretrained(adapter_dir)
    probe = torch.tensor(tokenizer([e.prompt for e in eval_examples[:64]])["input_ids"])
    with torch.no_grad():
        lofit_logits = model(input_ids=probe).logits
    handle.remove()
    timings["step2_tune"] = time.perf_counter() - phase
    log(f"step 2 done in {timings['step2_tune']:.1f}s: accuracy {lofit_accuracy:.3f}; adapter saved to {adapter_dir}")

    # -- the baseline: the same step 2 on random heads -------------------------------------------
    random_runs = []
    phase = time.perf_counter()
    for run in range(settings.random_runs):
        heads_seed = seed * settings.random_runs + run  # distinct draws for every demo seed and run
        random_heads = random_ranking(model, seed=heads_seed)
        handle, accuracy = tune_and_score(random_heads)
        handle.remove()
        random_runs.append({"heads_seed": heads_seed, "heads": [list(h) for h in random_heads.top(k)],
                            "accuracy": accuracy})
        log(f"random heads (seed {heads_seed}) {random_heads.top(k)}: accuracy {accuracy:.3f}")
    timings["random_heads"] = time.perf_counter() - phase

    # -- reload the adapter on a fresh copy of the base ------------------------------------------
    reload = _reload_check(settings, base_state, adapter_dir, eval_examples, tokenizer, probe, lofit_logits,
                           lofit_accuracy)
    log(f"reloaded the adapter with load_adapter on a fresh copy of the base: accuracy {reload['accuracy']:.3f} "
        f"({'matches' if reload['matches'] else 'DOES NOT MATCH'}; "
        f"max logit difference {reload['max_logit_difference']:.1e})")
    timings["total"] = log.elapsed()

    random_accuracies = [run["accuracy"] for run in random_runs]
    random_mean, random_best = statistics.mean(random_accuracies), max(random_accuracies)
    table = [
        {"method": "base model", "heads": 0, "accuracy": base_accuracy},
        {"method": f"LoFiT top-{k}", "heads": k, "accuracy": lofit_accuracy},
        {"method": f"random {k} heads, mean of {len(random_runs)} seeds", "heads": k, "accuracy": random_mean},
        {"method": f"random {k} heads, best of {len(random_runs)} seeds", "heads": k, "accuracy": random_best},
    ]
    results = {
        "lofit_fast_version": __version__, "demo_version": DEMO_VERSION, "quick": quick, "seed": seed,
        "task": {"new_word": NEW_WORD, "means": NEW_WORD_MEANS, "skills": SKILLS,
                 "train_examples": len(train_examples), "eval_examples": len(eval_examples),
                 "example": asdict(example)},
        "base_model": {"cache_path": cache_path, "loaded_from_cache": cached, "skill_accuracy": skill_accuracy,
                       "parameters": sum(p.numel() for p in model.parameters())},
        "table": table,
        "lofit_heads": [list(head) for head in ranking.top(k)],
        "random_runs": random_runs,
        "lofit_beats_random_mean": lofit_accuracy > random_mean,
        "lofit_beats_random_best": lofit_accuracy > random_best,
        "margin_over_random_mean": lofit_accuracy - random_mean,
        "verdict": _verdict(k, lofit_accuracy, random_accuracies, spread),
        "step1_score_spread": spread,
        "reload": reload,
        "settings": asdict(settings),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
    }
    _print_report(results, output_dir)
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1))
    return results


def _spread_text(spread: dict, k: int) -> str:
    ratio = spread["top_k_mean_over_median"]
    text = ("scores " + " ".join(f"{score:.3f}" for score in spread["top_scores"])
            + f", median {spread['median_score']:.4f}: "
            + (f"top-{k} mean is {ratio:.1f}x the median" if ratio is not None else "the median is 0"))
    return text + ("" if is_localized(spread) else " (flat: step 1 did not localize)")


def _reload_check(settings, base_state, adapter_dir, eval_examples, tokenizer, probe, lofit_logits,
                  lofit_accuracy) -> dict:
    """Load the saved adapter onto a fresh copy of the base and compare it with the trained model."""
    from . import load_adapter

    fresh = new_model(settings)
    fresh.load_state_dict(base_state)
    handle = load_adapter(fresh, adapter_dir, backend="torch", trainable=False)
    accuracy = next_token_accuracy(fresh, eval_examples, tokenizer)
    with torch.no_grad():
        difference = (fresh(input_ids=probe).logits - lofit_logits).abs().max().item()
    handle.remove()
    # fp32 round-off only: the same offsets through the same code, in another model object.
    return {"accuracy": accuracy, "max_logit_difference": difference,
            "matches": difference < 1e-4 and accuracy == lofit_accuracy}


def _verdict(k: int, lofit_accuracy: float, random_accuracies: list, spread: dict) -> str:
    """One honest sentence comparing LoFiT's heads with the random ones."""
    runs = len(random_accuracies)
    mean, best = statistics.mean(random_accuracies), max(random_accuracies)
    if lofit_accuracy > mean:
        return (f"LoFiT's top-{k} heads beat random heads by {lofit_accuracy - mean:+.3f} on average"
                + (f" and the best of {runs} random draws by {lofit_accuracy - best:+.3f}." if lofit_accuracy > best
                   else f", but not the best of {runs} random draws ({best:.3f})."))
    why = ("Step 1's ranking is flat, so it did not localize: try a stronger L1 or more step-1 steps."
           if not is_localized(spread) else
           "Step 1 did separate the heads; the offsets may need more steps or a higher learning rate.")
    return f"LoFiT's top-{k} heads do NOT beat random heads here ({lofit_accuracy - mean:+.3f} vs their mean). {why}"


def _print_report(results: dict, output_dir: str) -> None:
    k = results["settings"]["k"]
    print()
    print(f"accuracy on '{NEW_WORD}' (= '{NEW_WORD_MEANS}'), {results['task']['eval_examples']} held-out prompts, "
          f"seed {results['seed']}" + (" [quick smoke run: too small to mean much]" if results["quick"] else ""))
    print(f"  {'method':<34} {'heads':>5}  {'accuracy':>8}")
    for row in results["table"]:
        print(f"  {row['method']:<34} {row['heads']:>5}  {row['accuracy']:>8.3f}")
    print("  random runs: " + ", ".join(f"{run['accuracy']:.3f}" for run in results["random_runs"]))
    print(f"  step-1 {_spread_text(results['step1_score_spread'], k)}")
    print(f"  {results['verdict']}")
    print(f"  total {results['timings_s']['total']:.1f}s; wrote ranking.json, heads.png, adapter/, results.json "
          f"to {output_dir}")
