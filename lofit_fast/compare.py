"""`lofit compare`: LoFiT against its baselines, each at its trainable-parameter count, over several seeds.

    lofit compare                     # on the demo's base and task (cached; CPU, minutes): table, compare.json/png
    lofit compare --model PATH --task sft --data train.jsonl --eval-data test.jsonl   # on your model

The rows (`Method`): LoFiT top-K (step 1's heads), K random heads, probe top-K (the ITI localizer), LoFiT offsets
on every head, PEFT LoRA on o_proj and on PEFT's default targets (q_proj, v_proj for Llama) at several ranks, and
PEFT IA3. Every row trains on the same rows with the same Trainer settings (epochs, batch, seed, linear decay;
only the learning rate is each method's own), is scored by the same evaluation, and reports its trainable
parameters as PEFT's `get_nb_trainable_parameters` counts them. Each runs once per seed (the seed draws the
demo's training prompts, the initialisation and the random heads); the table gives mean, std and range.

On the demo it also runs the paper's transfer test of task specificity: heads that step 1 chose on one built-in
task (the new word taught another of the base's skills), used for step 2 on every other task.
The model is adapted in place and put back after every run (LoFiT removed, PEFT unloaded).
"""

import concurrent.futures
import contextlib
import datetime
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from . import demo
from .io import atomic_path, atomic_write_text
from .ranking import random_ranking, resolve_k

# Method families: offsets on K heads of a ranking, LoFiT offsets on every head, and PEFT's adapters.
HEAD_FAMILIES = ("lofit", "random", "probe")
PEFT_FAMILIES = ("lora-o_proj", "lora-qv", "ia3")
FAMILIES = (*HEAD_FAMILIES, "lofit-all", *PEFT_FAMILIES)
# Two methods are level on a seed when their accuracies differ by at most this: 10 of the demo's 2,000 held-out
# prompts.
TIE_MARGIN = 0.005


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One row of the comparison. family: one of FAMILIES; k: heads (HEAD_FAMILIES); rank: LoRA's rank."""

    family: str
    k: Optional[int] = None
    rank: Optional[int] = None

    @property
    def label(self) -> str:
        return {"lofit": f"LoFiT top-{self.k}", "random": f"random {self.k} heads", "probe": f"probe top-{self.k}",
                "lofit-all": "LoFiT, all heads", "lora-o_proj": f"LoRA o_proj r={self.rank}",
                "lora-qv": f"LoRA q,v r={self.rank}", "ia3": "IA3"}[self.family]


def method_grid(families, head_counts, lora_ranks) -> list:
    """Every method of `families` at every K of `head_counts` (head families) or rank of `lora_ranks` (LoRA)."""
    unknown = [family for family in families if family not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown method families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    methods = []
    for family in families:
        if family in HEAD_FAMILIES:
            methods += [Method(family, k=k) for k in head_counts]
        elif family.startswith("lora-"):
            methods += [Method(family, rank=rank) for rank in lora_ranks]
        else:
            methods.append(Method(family))
    return methods


@dataclass(frozen=True)
class Run:
    """One training run: `method` trained on `task` with `seed`; head families take their heads from the
    ranking made on `heads_from` (the transfer test uses another task's)."""

    method: Method
    task: str
    heads_from: str
    seed: int

    def ranking_key(self) -> Optional[tuple]:
        """(localizer, task, seed) of the step-1 ranking this run needs, or None."""
        if self.method.family in ("lofit", "probe"):
            return (self.method.family, self.heads_from, self.seed)
        return None


# ----------------------------------------------------------------------------------------------
# Benches: a model, its tasks, and how each is trained and scored
# ----------------------------------------------------------------------------------------------

class DemoBench:
    """The demo's cached base and its tasks: the unseen word NEW_WORD taught one of the base's skills (a task is
    named by that skill). Training and scoring as `lofit demo` does them."""

    quiet = True
    loss = "sft"
    backend = "torch"

    def __init__(self, comparison: "DemoComparison", scratch: str, log=print):
        self.comparison, self.settings, self.scratch = comparison, comparison.demo, scratch
        self.tokenizer = demo.build_tokenizer(self.settings)
        self.model, self.cache_path, self.loaded_from_cache = demo.load_or_pretrain_base(self.settings,
                                                                                          self.tokenizer, log)
        self.collator = demo.collate
        self.training_args = demo.trainer_arguments(scratch)
        self._data = {}

    def _task_data(self, task: str, seed: int) -> tuple:
        if (task, seed) not in self._data:
            train, held_out = demo.adaptation_data(self.settings, seed, means=task)
            self._data[task, seed] = (demo.encode(train, self.tokenizer), held_out)
        return self._data[task, seed]

    def train_rows(self, task: str, seed: int) -> list:
        return self._task_data(task, seed)[0]

    def accuracy(self, task: str) -> float:
        # The held-out prompts are the same for every seed.
        return demo.next_token_accuracy(self.model, self._task_data(task, 0)[1], self.tokenizer)

    def select_settings(self, seed: int):
        return demo.select_step_settings(self.settings, seed)

    def tune_settings(self, seed: int, learning_rate: Optional[float] = None):
        return demo.tune_step_settings(self.settings, seed, learning_rate)

    def peft_learning_rate(self, family: str) -> float:
        return self.comparison.ia3_lr if family == "ia3" else self.comparison.lora_lr


class ModelBench:
    """A user's model and one SFT task: rows tokenized by the pipeline, scored by exact match of greedy generation
    (`evaluation.evaluate_generation`). The data is the same for every seed (with `train_size`, the seed draws
    the subset, as in `tune`)."""

    quiet = False
    loss = "sft"

    def __init__(self, model, tokenizer, train_rows: list, collator, eval_examples: list, *,
                 select_settings, tune_settings, lora_lr: float, ia3_lr: float, scratch: str,
                 training_args: Optional[dict], backend: str, max_new_tokens: int, eval_batch_size: int,
                 chat_template: bool):
        self.model, self.tokenizer = model, tokenizer
        self.rows, self.collator, self.eval_examples = train_rows, collator, eval_examples
        self.select, self.tune, self.lora_lr, self.ia3_lr = select_settings, tune_settings, lora_lr, ia3_lr
        self.scratch, self.backend = scratch, backend
        self.training_args = {**(training_args or {}), "output_dir": scratch}
        self.max_new_tokens, self.eval_batch_size, self.chat_template = max_new_tokens, eval_batch_size, chat_template

    def train_rows(self, task: str, seed: int) -> list:
        return self.rows

    def accuracy(self, task: str) -> float:
        from .evaluation import evaluate_generation

        return evaluate_generation(self.model, self.tokenizer, self.eval_examples, max_new_tokens=self.max_new_tokens,
                                   batch_size=self.eval_batch_size, task=task, chat_template=self.chat_template)

    def select_settings(self, seed: int):
        return replace(self.select, seed=seed)

    def tune_settings(self, seed: int, learning_rate: Optional[float] = None):
        return replace(self.tune, seed=seed,
                       learning_rate=self.tune.learning_rate if learning_rate is None else learning_rate)

    def peft_learning_rate(self, family: str) -> float:
        return self.ia3_lr if family == "ia3" else self.lora_lr


def _training_quietly(bench):
    return demo.quiet_trainer() if bench.quiet else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# One ranking, one run
# ----------------------------------------------------------------------------------------------

def rank_heads(bench, localizer: str, task: str, seed: int):
    """Step 1 on `task` with `seed`: the HeadRanking of `select_heads` with `localizer` ("lofit" or "probe")."""
    from .training import select_heads

    with _training_quietly(bench):
        return select_heads(bench.model, bench.train_rows(task, seed), bench.collator, loss=bench.loss,
                            settings=bench.select_settings(seed), localizer=localizer,
                            output_dir=os.path.join(bench.scratch, f"select-{localizer}-{task}-{seed}"),
                            training_args=bench.training_args, backend=bench.backend)


def train_and_score(bench, run: Run, ranking=None) -> dict:
    """Train `run.method` on the bench's model, score it on `run.task`, and put the model back. `ranking`: the
    step-1 ranking of `run.ranking_key()`. Returns the run's record (accuracy, trainable and all parameters,
    seconds, and the heads or PEFT targets it trained)."""
    started = time.perf_counter()
    method, rows = run.method, bench.train_rows(run.task, run.seed)
    parameter_names = [name for name, _ in bench.model.named_parameters()]
    if method.family in PEFT_FAMILIES:
        trainable, total, accuracy, trained = _peft_run(bench, method, rows, run)
    else:
        trainable, total, accuracy, trained = _lofit_run(bench, method, rows, run, ranking)
    # Every later run starts from this model: an adapter left on it would change them all.
    if [name for name, _ in bench.model.named_parameters()] != parameter_names:
        raise RuntimeError(f"{method.label} left parameters on the model it was trained on")
    return {"method": method.label, "family": method.family, "k": method.k, "rank": method.rank, "task": run.task,
            "heads_from": run.heads_from, "seed": run.seed, "accuracy": accuracy, "trainable_params": trainable,
            "all_params": total, "trained": trained, "seconds": time.perf_counter() - started}


def _lofit_run(bench, method: Method, rows: list, run: Run, ranking) -> tuple:
    from .lofit_model import LofitConfig, LofitModel
    from .patch import attention_shape
    from .training import tune

    if method.family == "lofit-all":
        shape = attention_shape(bench.model)
        heads = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    elif method.family == "random":
        heads = random_ranking(bench.model, seed=run.seed).top(method.k)
    else:
        heads = ranking.top(method.k)
    with _training_quietly(bench):
        handle = tune(bench.model, rows, bench.collator, heads=heads, loss=bench.loss,
                      settings=bench.tune_settings(run.seed), output_dir=bench.scratch,
                      training_args=bench.training_args, backend=bench.backend)
    try:
        # The count of LofitModel, LoFiT's PEFT-shaped wrapper, which counts as PEFT does.
        trainable, total = LofitModel(handle, LofitConfig(heads=handle.heads)).get_nb_trainable_parameters()
        accuracy = bench.accuracy(run.task)
    finally:
        handle.remove()
    return trainable, total, accuracy, [list(head) for head in heads]


def _peft_run(bench, method: Method, rows: list, run: Run) -> tuple:
    from transformers import Trainer

    from .data import training_subset
    from .training import quiet_when_asked, training_arguments

    settings = bench.tune_settings(run.seed, bench.peft_learning_rate(method.family))
    torch.manual_seed(run.seed)  # LoRA's A matrices are drawn when PEFT builds the layers
    with peft_wrapped(bench.model, method) as peft_model:
        arguments = training_arguments(bench.scratch, settings, bench.training_args)
        # The same rows as step 2 trains on: its seeded subset when settings.train_size is set.
        trainer = Trainer(model=peft_model, args=arguments, data_collator=bench.collator,
                          train_dataset=training_subset(rows, settings.train_size, settings.seed))
        quiet_when_asked(trainer)  # as `tune` does
        with _training_quietly(bench):
            trainer.train()
        trainable, total = peft_model.get_nb_trainable_parameters()
        accuracy = bench.accuracy(run.task)
        targets = sorted(peft_model.peft_config["default"].target_modules)
    return trainable, total, accuracy, targets


@contextlib.contextmanager
def peft_wrapped(model, method: Method):
    """`model` inside PEFT's wrapper for the row `method`; afterwards the base's own modules are back in place,
    unmerged, with their requires_grad flags (PEFT freezes them)."""
    peft = _import_peft()
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    peft_model = peft.get_peft_model(model, peft_config(method, model))
    try:
        yield peft_model
    finally:
        peft_model.unload()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])


def check_peft_rows(model, methods: list) -> None:
    """Build (and take off again) PEFT's wrapper of every LoRA / IA3 row on `model`, so that a row PEFT cannot
    build there (no default targets for the architecture, a layer type it does not adapt) fails before any
    training, not after hours of it. ValueError naming the row and PEFT's reason."""
    for method in methods:
        if method.family not in PEFT_FAMILIES:
            continue
        try:
            with peft_wrapped(model, method):
                pass
        except (ValueError, TypeError, NotImplementedError, KeyError) as error:
            raise ValueError(f"PEFT cannot build the {method.label} row on this model ({type(error).__name__}: "
                             f"{error}); leave {method.family} out of --methods") from None


def _import_peft():
    try:
        import peft
    except ImportError:
        raise RuntimeError("lofit compare trains PEFT's LoRA and IA3 as baselines and needs the peft package: "
                           "pip install peft (or pip install 'lofit_fast[bench]')") from None
    return peft


def peft_config(method: Method, model):
    """PEFT's config for a LoRA or IA3 row: LoRA with lora_alpha = 2 * rank (the same scale alpha / r at every
    rank) and no dropout (LoFiT has none) on every layer's attention output projection ("lora-o_proj") or on
    PEFT's default targets for the architecture ("lora-qv": q_proj and v_proj for Llama); IA3 on PEFT's default
    targets (Llama: k_proj, v_proj and down_proj)."""
    peft = _import_peft()
    if method.family == "ia3":
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

        if model.config.model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            raise ValueError(f"PEFT has no default IA3 targets for model_type {model.config.model_type!r}, so the "
                             f"ia3 row has nothing to adapt: leave ia3 out of --methods")
        return peft.IA3Config(task_type="CAUSAL_LM")
    return peft.LoraConfig(r=method.rank, lora_alpha=2 * method.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=lora_targets(method.family, model))


def lora_targets(family: str, model) -> list:
    """The module names LoRA adapts: every layer's o_proj (by its full name, as LoFiT finds it), or PEFT's
    default LoRA targets for the model's architecture."""
    if family == "lora-o_proj":
        from .patch import find_o_projs

        o_projs = {id(module) for module in find_o_projs(model)}
        return [name for name, module in model.named_modules() if id(module) in o_projs]
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = model.config.model_type
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ValueError(f"PEFT has no default LoRA targets for model_type {model_type!r}, so the lora-qv rows "
                         f"have nothing to adapt: leave lora-qv out of --methods")
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


# ----------------------------------------------------------------------------------------------
# Running the jobs: in this process, or in worker processes that each load the demo's base
# ----------------------------------------------------------------------------------------------

_worker_bench = None  # a worker process's DemoBench


def _start_worker(comparison: "DemoComparison", scratch: str) -> None:
    global _worker_bench
    torch.set_num_threads(1)  # as the demo: one thread per process, on a tiny model
    _worker_bench = DemoBench(comparison, os.path.join(scratch, f"worker-{os.getpid()}"), log=lambda message: None)


def _do_job(bench, job, ranking):
    if isinstance(job, Run):
        return train_and_score(bench, job, ranking)
    return rank_heads(bench, *job)


def _do_job_in_worker(job, ranking):
    return _do_job(_worker_bench, job, ranking)


def _run_jobs(jobs: list, bench, pool, rankings: dict, log, on_result=None) -> list:
    """The results of `jobs` (Runs, or (localizer, task, seed) ranking keys), in order; each is logged (and given
    to `on_result(job, result)`) as it finishes. With a pool, the jobs run in its worker processes; otherwise
    here, on `bench`."""
    def report(job, result):
        if on_result is not None:
            on_result(job, result)
        if isinstance(job, Run):
            log(f"{job.method.label} on '{_task_name(job.task)}'"
                + (f" with the heads of '{_task_name(job.heads_from)}'" if job.heads_from != job.task else "")
                + f", seed {job.seed}: accuracy {result['accuracy']:.3f} "
                  f"({result['trainable_params']:,d} trainable parameters, {result['seconds']:.1f}s)")
        else:
            log(f"{job[0]} ranking on '{_task_name(job[1])}', seed {job[2]}: top heads {result.top(5)}")

    needed = [rankings.get(job.ranking_key()) if isinstance(job, Run) else None for job in jobs]
    if pool is None:
        results = []
        for job, ranking in zip(jobs, needed):
            results.append(_do_job(bench, job, ranking))
            report(job, results[-1])
        return results
    futures = {pool.submit(_do_job_in_worker, job, ranking): index
               for index, (job, ranking) in enumerate(zip(jobs, needed))}
    results = [None] * len(jobs)
    for future in concurrent.futures.as_completed(futures):
        index = futures[future]
        results[index] = future.result()
        report(jobs[index], results[index])
    return results


@contextlib.contextmanager
def _worker_pool(comparison: "DemoComparison", workers: int, scratch: str):
    """None for one worker (jobs run in this process), else a pool of spawned processes (spawned, not forked:
    a fork of a process whose OpenMP threads have run can hang)."""
    if workers <= 1:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(comparison, scratch))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error, the jobs not started yet do not run


PARTIAL_NAME = "compare-runs.partial.json"


def _execute(runs: list, bench, pool, log, output_dir: str) -> tuple:
    """(rankings by key, records by run): the step-1 rankings the runs need first, then each distinct run once.
    Every finished run's record is also kept in `output_dir/compare-runs.partial.json` (rewritten atomically), so
    that what was measured survives an error or an interruption in a later run; the report removes it."""
    ranking_keys = sorted({run.ranking_key() for run in runs if run.ranking_key() is not None})
    rankings = dict(zip(ranking_keys, _run_jobs(ranking_keys, bench, pool, {}, log)))
    distinct = list(dict.fromkeys(runs))
    finished = []
    partial_path = os.path.join(output_dir, PARTIAL_NAME)

    def keep(run, record):
        finished.append(record)
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_text(partial_path, json.dumps({"finished_runs": len(finished), "of": len(distinct),
                                                    "runs": finished}, indent=1, allow_nan=False))

    return rankings, dict(zip(distinct, _run_jobs(distinct, bench, pool, rankings, log, keep)))


# ----------------------------------------------------------------------------------------------
# Summaries: a row per method, verdicts, the transfer matrix
# ----------------------------------------------------------------------------------------------

def summarize(method: Method, records: list) -> dict:
    """The table row of `method` from its runs (one per seed): mean, std (0 for one seed), min and max
    accuracy, and the trainable-parameter count (the same in every run)."""
    counts = {(record["trainable_params"], record["all_params"]) for record in records}
    if len(counts) != 1:
        raise RuntimeError(f"{method.label}: the parameter counts differ between seeds ({sorted(counts)})")
    (trainable, total), = counts
    accuracies = [record["accuracy"] for record in records]
    return {"method": method.label, "family": method.family, "k": method.k, "rank": method.rank,
            "trainable_params": trainable, "all_params": total, "trainable_percent": 100 * trainable / total,
            "seeds": [record["seed"] for record in records], "accuracies": accuracies,
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies)}


def paired_comparison(a: list, b: list) -> dict:
    """Two methods' accuracies seed by seed (the same seeds, in the same order: each seed gives both the same
    training data). A seed counts as ahead or behind when its difference exceeds TIE_MARGIN; the verdict is
    "beats" (ahead in some seeds, behind in none, mean difference beyond the margin), "loses to", "ties with"
    (level in every seed) or "is mixed against". Seeds, not spreads, decide: one method's wide spread over
    seeds (random heads) must not hide that the other is ahead in every one of them."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} seeds: give both the same seeds")
    differences = [x - y for x, y in zip(a, b)]
    margin = TIE_MARGIN + 1e-9  # accuracies are fractions of prompts: exactly the margin apart is level
    ahead = sum(difference > margin for difference in differences)
    behind = sum(difference < -margin for difference in differences)
    difference = statistics.mean(differences)
    if ahead and not behind and difference > margin:
        word = "beats"
    elif behind and not ahead and difference < -margin:
        word = "loses to"
    elif not ahead and not behind:
        word = "ties with"
    else:
        word = "is mixed against"
    return {"difference": difference, "word": word, "ahead": ahead, "behind": behind, "seeds": len(a)}


def _compared(a: dict, b: dict) -> tuple:
    """(the paired comparison of two table rows, the sentence that states it)."""
    result = paired_comparison(a["accuracies"], b["accuracies"])
    level = result["seeds"] - result["ahead"] - result["behind"]
    sentence = (f"{_described(a)} {result['word']} {_described(b)}: {result['difference']:+.3f}, ahead in "
                f"{result['ahead']}, behind in {result['behind']}, level in {level} of {result['seeds']} seeds")
    return result, sentence


def _described(row: dict) -> str:
    return f"{row['method']} ({row['accuracy_mean']:.3f}, {row['trainable_params']:,d} params)"


def verdicts(rows: list) -> list:
    """Sentences that read the table as it came out: LoFiT's heads against random and probed heads at each K, the
    best PEFT row (LoRA / IA3) against the best LoFiT row, and the smallest LoFiT row that matches it, if any."""
    by_method = {row["method"]: row for row in rows}
    sentences = []
    for row in rows:
        if row["family"] != "lofit":
            continue
        for family in ("random", "probe"):
            other = by_method.get(Method(family, k=row["k"]).label)
            if other:
                sentences.append(_compared(row, other)[1] + ".")
    lofit_rows = sorted((row for row in rows if row["family"] in ("lofit", "lofit-all")),
                        key=lambda row: row["trainable_params"])
    dense_rows = [row for row in rows if row["family"] in PEFT_FAMILIES]
    if not (lofit_rows and dense_rows):
        return sentences
    # Best by mean; among equal means, the fewest parameters.
    best_lofit = max(lofit_rows, key=lambda row: (row["accuracy_mean"], -row["trainable_params"]))
    best_dense = max(dense_rows, key=lambda row: (row["accuracy_mean"], -row["trainable_params"]))
    result, sentence = _compared(best_dense, best_lofit)
    ratio = best_dense["trainable_params"] / best_lofit["trainable_params"]
    outcome = {"beats": "LoRA/IA3 WINS", "loses to": "LoFiT wins", "ties with": "a tie"}.get(result["word"], "mixed")
    sentences.append(f"Best PEFT row: {sentence}, with {ratio:,.0f}x the parameters: {outcome}.")
    matching = [row for row in lofit_rows if paired_comparison(row["accuracies"], best_dense["accuracies"])["word"]
                in ("beats", "ties with")]
    if matching:
        smallest = matching[0]
        sentences.append(f"The smallest LoFiT row level with or above it, {_described(smallest)}, trains "
                         f"{best_dense['trainable_params'] / smallest['trainable_params']:,.0f}x fewer parameters.")
    else:
        sentences.append("No LoFiT row is level with the best PEFT row in every seed: LoRA/IA3 WINS on accuracy.")
    smallest_dense = min(dense_rows, key=lambda row: row["trainable_params"])
    if smallest_dense["trainable_params"] > lofit_rows[-1]["trainable_params"]:
        sentences.append(f"No PEFT row is as small as LoFiT: the smallest, {smallest_dense['method']}, trains "
                         f"{smallest_dense['trainable_params'] / lofit_rows[-1]['trainable_params']:,.1f}x the "
                         f"parameters of the largest LoFiT row, so LoRA is compared at more parameters, never equal.")
    return sentences


def transfer_matrix(records: dict, tasks: list, k: int, seeds: list, base_accuracy: dict) -> dict:
    """The transfer test's accuracies, means over `seeds`: accuracy[i][j] is step 2 on tasks[j] with the top-K
    heads step 1 chose on tasks[i] (the diagonal: each task's own heads); `random` the same step 2 on K random
    heads; `base` the base model. `records` maps Runs to their records."""
    def accuracies(method: Method, task: str, heads_from: str) -> list:
        return [records[Run(method, task, heads_from, seed)]["accuracy"] for seed in seeds]

    cells = [[accuracies(Method("lofit", k=k), task, source) for task in tasks] for source in tasks]
    matrix = [[statistics.mean(cell) for cell in row] for row in cells]
    random_row = [statistics.mean(accuracies(Method("random", k=k), task, task)) for task in tasks]
    sentences = []
    for column, task in enumerate(tasks):
        own = matrix[column][column]
        best_other, best_source = max((matrix[row][column], row) for row in range(len(tasks)) if row != column)
        word = paired_comparison(cells[column][column], cells[best_source][column])["word"]
        sentences.append(f"On '{_task_name(task)}', step 2 on its own top-{k} heads ({own:.3f}) {word} step 2 on "
                         f"the heads chosen on '{_task_name(tasks[best_source])}' ({best_other:.3f}); on {k} random "
                         f"heads {random_row[column]:.3f}, base model {base_accuracy[task]:.3f}.")
    return {"tasks": list(tasks), "task_names": [_task_name(task) for task in tasks], "k": k, "seeds": list(seeds),
            "accuracy": matrix, "random": random_row, "base": [base_accuracy[task] for task in tasks],
            "verdicts": sentences}


def _task_name(task: str) -> str:
    """A demo task by its skill ("last" -> "final=last"); a user's task by its name."""
    return f"{demo.NEW_WORD}={task}" if task in demo.SKILLS else task


# ----------------------------------------------------------------------------------------------
# Report: the table, the matrix, compare.json, compare.png
# ----------------------------------------------------------------------------------------------

def format_table(rows: list, base_accuracy: float) -> str:
    lines = [f"  {'method':<22} {'trainable params':>16} {'% of model':>10}  {'accuracy: mean ± std':>20}  "
             f"{'[min, max]':>14}",
             f"  {'base model':<22} {0:>16,d} {0:>10.4f}  {base_accuracy:>20.3f}"]
    for row in rows:
        spread = f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}"
        lines.append(f"  {row['method']:<22} {row['trainable_params']:>16,d} {row['trainable_percent']:>10.4f}  "
                     f"{spread:>20}  [{row['accuracy_min']:.3f}, {row['accuracy_max']:.3f}]")
    return "\n".join(lines)


def format_transfer(matrix: dict) -> str:
    names = matrix["task_names"]
    width = max(14, *(len(name) + 2 for name in names))
    lines = [f"  {'heads chosen on':<22}" + "".join(f"{name:>{width}}" for name in names)]
    for source, row in zip(names, matrix["accuracy"]):
        lines.append(f"  {source:<22}" + "".join(f"{value:>{width}.3f}" for value in row))
    lines.append(f"  {'random ' + str(matrix['k']) + ' heads':<22}"
                 + "".join(f"{value:>{width}.3f}" for value in matrix["random"]))
    lines.append(f"  {'base model':<22}" + "".join(f"{value:>{width}.3f}" for value in matrix["base"]))
    return "\n".join(lines)


# One marker per family. Families that share parameter counts (the head families at each K; on the demo, LoRA
# o_proj r=2, LoRA q,v r=1 and IA3 all train 3,072) are shifted sideways by these factors on the log axis, so
# that no error bar hides another.
_MARKERS = {"lofit": ("o", 1.0), "random": ("x", 0.85), "probe": ("^", 1.18), "lofit-all": ("s", 1.0),
            "lora-o_proj": ("D", 0.88), "lora-qv": ("v", 1.0), "ia3": ("P", 1.14)}
_FAMILY_NAMES = {"lofit": "LoFiT top-K", "random": "random K heads", "probe": "probe top-K",
                 "lofit-all": "LoFiT, all heads", "lora-o_proj": "LoRA on o_proj", "lora-qv": "LoRA on q,v",
                 "ia3": "IA3"}


def plot_comparison(rows: list, base_accuracy: float, path, title: str) -> None:
    """Write a PNG of mean accuracy (error bars: std over seeds) against trainable parameters (log scale) to
    `path`, one marker per method family, rows of a family joined by a line; the base model as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for family in FAMILIES:
        points = sorted((row for row in rows if row["family"] == family), key=lambda row: row["trainable_params"])
        if not points:
            continue
        marker, shift = _MARKERS[family]
        axes.errorbar([row["trainable_params"] * shift for row in points], [row["accuracy_mean"] for row in points],
                      yerr=[row["accuracy_std"] for row in points], marker=marker, markersize=7, capsize=3,
                      linewidth=1, label=_FAMILY_NAMES[family])
    axes.axhline(base_accuracy, color="grey", linestyle="--", linewidth=1, label="base model")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (as PEFT counts them; log scale; equal counts shifted sideways)")
    axes.set_ylabel("held-out accuracy (mean ± std over seeds)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)  # the temporary name ends in .tmp: the format by name


def _machine() -> dict:
    from .bench.common import device_name

    return {"cpu": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__}


def _report(results: dict, output_dir: str, title: str, heading: str) -> dict:
    """Print the table (and the transfer matrix), write compare.json and compare.png; return `results`."""
    print()
    print(heading)
    print(format_table(results["rows"], results["base_accuracy"]))
    for sentence in results["verdicts"]:
        print(f"  {sentence}")
    if results.get("transfer"):
        transfer = results["transfer"]
        print()
        print(f"task specificity: step 2 (offsets on the top-{transfer['k']} heads) on each task (columns) with the "
              f"heads step 1 chose on each task (rows); seed(s) {', '.join(map(str, transfer['seeds']))}")
        print(format_transfer(transfer))
        for sentence in transfer["verdicts"]:
            print(f"  {sentence}")
    os.makedirs(output_dir, exist_ok=True)
    plot_comparison(results["rows"], results["base_accuracy"], os.path.join(output_dir, "compare.png"), title)
    # allow_nan=False: strict JSON, which every reader accepts.
    atomic_write_text(os.path.join(output_dir, "compare.json"), json.dumps(results, indent=1, allow_nan=False))
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, PARTIAL_NAME))  # every run is in compare.json now
    print(f"  total {results['timings_s']['total']:.1f}s on {results['machine']['cpu']} "
          f"({results['machine']['cpu_count']} cores, {results['workers']} worker process(es)); wrote compare.json "
          f"and compare.png to {output_dir}")
    return results


def _rows(methods: list, task: str, seeds: list, records: dict) -> list:
    return [summarize(method, [records[Run(method, task, task, seed)] for seed in seeds]) for method in methods]


def _rankings_json(rankings: dict) -> list:
    return [{"localizer": localizer, "task": task, "seed": seed,
             "ranking": [[layer, head, score] for layer, head, score in ranking.ranking]}
            for (localizer, task, seed), ranking in rankings.items()]


# ----------------------------------------------------------------------------------------------
# On the demo
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoComparison:
    """What `lofit compare` runs on the demo: its base model and budget (`demo`), and the grid.

    head_fractions: K of the head rows, as shares of all heads. lora_lr / ia3_lr: the PEFT rows' learning rates
    (LoFiT's are the demo's). transfer_skills: the transfer test's tasks, "NEW_WORD means <skill>"; the first is
    the demo's own task (NEW_WORD_MEANS), the one the table is about (that one alone: no transfer test).
    transfer_seeds: the seeds it runs.
    """

    demo: demo.DemoSettings
    seeds: tuple
    head_fractions: tuple
    lora_ranks: tuple
    lora_lr: float
    ia3_lr: float
    transfer_skills: tuple
    transfer_fraction: float
    transfer_seeds: tuple


# The demo's budget (200 Adam steps of batch 32 per run, 2,000 held-out prompts), 3 seeds. The PEFT rows'
# learning rates are the best of 3e-3, 1e-2 and 3e-2 on seed 0 (LoRA o_proj r=1, q,v r=2 and r=8 all best or
# level at 1e-2; IA3 best at 3e-2), as LoFiT's 3e-2 is the demo's: each method gets its own good rate.
# Transfer tasks: "final" taught "first" or "second" (beside the demo's "last"); "penultimate" was left out:
# no ranking's 3 heads reached it (at most 0.03 accuracy).
FULL = DemoComparison(demo=demo.FULL, seeds=(0, 1, 2), head_fractions=(0.01, 0.03, 0.10), lora_ranks=(1, 2, 8),
                      lora_lr=1e-2, ia3_lr=3e-2, transfer_skills=("last", "first", "second"),
                      transfer_fraction=0.03, transfer_seeds=(0,))
# A smoke run (and what the tests run, smaller still): too small to mean anything.
QUICK = DemoComparison(demo=demo.QUICK, seeds=(0, 1), head_fractions=(0.125, 0.25), lora_ranks=(1,),
                       lora_lr=1e-2, ia3_lr=3e-2, transfer_skills=("last", "first"), transfer_fraction=0.25,
                       transfer_seeds=(0,))


def default_workers() -> int:
    """Worker processes for the demo comparison: one per core, at most 2 (the budget is 2 cores)."""
    return max(1, min(2, os.cpu_count() or 1))


def run_demo_comparison(output_dir: str = "lofit_compare", quick: bool = False, workers: int = 1,
                        comparison: Optional[DemoComparison] = None) -> dict:
    """Compare LoFiT with its baselines on the demo's cached base and task, and run the transfer test; print the
    table and the matrix, and write compare.json and compare.png to `output_dir`. Returns compare.json's content.

    Args:
        output_dir: where compare.json and compare.png go.
        quick: the QUICK grid (a smoke run) instead of FULL.
        workers: processes that run the jobs, each on one thread with its own copy of the base; 1 (the default)
            runs everything in this process. Results do not depend on it. Workers are spawned, so a script that
            asks for more than 1 must call this under `if __name__ == "__main__":` (`lofit compare` uses
            `default_workers()`).
        comparison: a DemoComparison instead of FULL / QUICK.
    """
    comparison = comparison or (QUICK if quick else FULL)
    if workers < 1:
        raise ValueError(f"workers={workers}: give 1 or more worker processes")
    skills = comparison.transfer_skills
    if not skills or skills[0] != demo.NEW_WORD_MEANS or not set(skills) <= set(demo.SKILLS):
        raise ValueError(f"transfer_skills {comparison.transfer_skills}: skills of {tuple(demo.SKILLS)}, the first "
                         f"being the demo's task, {demo.NEW_WORD_MEANS!r}")
    _import_peft()  # before any training: the PEFT rows would fail at the end
    with demo.cpu_session("lofit_compare_") as scratch:
        return _run_demo_comparison(output_dir, comparison, workers, quick, scratch)


def _run_demo_comparison(output_dir: str, comparison: DemoComparison, workers: int, quick: bool, scratch: str):
    from .version import __version__
    log = demo.Progress()
    settings = comparison.demo
    # The base is pretrained (or loaded) here first, so that the workers all load it from the cache.
    bench = DemoBench(comparison, os.path.join(scratch, "main"), log=log)
    log(f"base model {'loaded from' if bench.loaded_from_cache else 'pretrained and cached in'} {bench.cache_path}")
    total_heads = settings.num_layers * settings.num_heads
    head_counts = sorted({resolve_k(fraction, total_heads) for fraction in comparison.head_fractions})
    methods = method_grid(FAMILIES, head_counts, comparison.lora_ranks)
    main_task, tasks = demo.NEW_WORD_MEANS, list(comparison.transfer_skills)
    transfer_k = resolve_k(comparison.transfer_fraction, total_heads)
    runs = [Run(method, main_task, main_task, seed) for method in methods for seed in comparison.seeds]
    # The transfer test needs a second task; with one, it is left out.
    transfer_seeds = comparison.transfer_seeds if len(tasks) > 1 else ()
    for seed in transfer_seeds:  # runs the table has already are run once
        for task in tasks:
            runs.append(Run(Method("random", k=transfer_k), task, task, seed))
            runs += [Run(Method("lofit", k=transfer_k), task, source, seed) for source in tasks]
    base_accuracy = {task: bench.accuracy(task) for task in tasks}
    log("base accuracy: " + ", ".join(f"'{_task_name(task)}' {base_accuracy[task]:.3f}" for task in tasks))
    log(f"{len(set(runs))} runs of {len(methods)} methods x {len(comparison.seeds)} seeds and the transfer test, "
        f"on {workers} worker process(es)")
    with _worker_pool(comparison, workers, scratch) as pool:
        rankings, records = _execute(runs, bench, pool, log, output_dir)
    rows = _rows(methods, main_task, list(comparison.seeds), records)
    transfer = (transfer_matrix(records, tasks, transfer_k, list(transfer_seeds), base_accuracy)
                if transfer_seeds else None)
    results = {
        "lofit_fast_version": __version__, "quick": quick, "machine": _machine(), "workers": workers,
        "torch_threads_per_worker": 1,
        "task": {"name": _task_name(main_task), "new_word": demo.NEW_WORD, "means": main_task,
                 "train_examples": settings.train_examples, "eval_examples": settings.eval_examples},
        "base_model": {"cache_path": bench.cache_path, "loaded_from_cache": bench.loaded_from_cache,
                       "total_heads": total_heads},
        "base_accuracy": base_accuracy[main_task], "rows": rows, "verdicts": verdicts(rows), "transfer": transfer,
        "runs": list(records.values()), "rankings": _rankings_json(rankings),
        "settings": {**asdict(comparison), "head_counts": head_counts, "transfer_k": transfer_k},
        "timings_s": {"total": log.elapsed(), "training_runs": sum(record["seconds"] for record in records.values())},
    }
    heading = (f"accuracy on '{_task_name(main_task)}', {settings.eval_examples} held-out prompts, "
               f"{len(comparison.seeds)} seeds ({settings.tune_steps} steps of batch {settings.batch_size} per run)"
               + (" [quick smoke run: too small to mean much]" if quick else ""))
    title = (f"'{_task_name(main_task)}' on the demo base, {len(comparison.seeds)} seeds\n"
             f"{results['machine']['cpu']}, {results['machine']['date']}")
    return _report(results, output_dir, title, heading)


# ----------------------------------------------------------------------------------------------
# On a user's model
# ----------------------------------------------------------------------------------------------

DEFAULT_MODEL_FAMILIES = ("lofit", "random", "lora-o_proj", "lora-qv")


def compare_on_model(model, tokenizer, train_rows: list, collator, eval_examples: list, *, task: str,
                     select_settings, tune_settings, head_counts: list, seeds=(0, 1, 2),
                     families=DEFAULT_MODEL_FAMILIES, lora_ranks=(1, 2, 8), lora_lr: float = 2e-4,
                     ia3_lr: float = 3e-3, output_dir: str = "lofit_compare", training_args: Optional[dict] = None,
                     backend: str = "auto", max_new_tokens: int = 16, eval_batch_size: int = 16,
                     chat_template: bool = False) -> dict:
    """The comparison on your model and SFT task, through the pipeline: `select_heads` / `tune` for the LoFiT
    rows, PEFT with the same Trainer settings for LoRA / IA3, `evaluate_generation` (exact match) for all.
    Prints the table, writes compare.json and compare.png to `output_dir`, and returns compare.json's content.
    The model is left as it was.

    Args:
        model, tokenizer: the base model (trained in place, put back after every run) and its tokenizer.
        train_rows, collator: SFT rows (`data.tokenize_sft`) and their collator (`data.SFTCollator`).
        eval_examples: `{"prompt", "answers"}` or `{"prompt", "completion"}` examples to score.
        task: the task's name ("clutrr" ends answers at a period; see `evaluation.is_correct`).
        select_settings, tune_settings: StepSettings of step 1 and step 2 (`paper_settings(task, model=model)`);
            their epochs, batch and train_size are also the PEFT rows'. The seed is each run's.
        head_counts: K of the head rows (counts, or fractions of all heads).
        seeds: one run of every method per seed.
        families: which rows (see FAMILIES).
        lora_ranks: LoRA's ranks. lora_lr, ia3_lr: their learning rates (2e-4, QLoRA's for 7B-65B models, and
            3e-3, IA3's paper's, by default: tune them for your model).
        training_args: Trainer overrides for every run (bf16, gradient accumulation, ...).
        backend: LoFiT's backend; max_new_tokens, eval_batch_size: the evaluation's generation settings.
        chat_template: prompts in the tokenizer's chat template when scoring (as the rows were tokenized).
    """
    from .patch import attention_shape
    from .quantization import keep_4bit_layers_differentiable
    from .version import __version__
    if not seeds:
        raise ValueError("give at least one seed")
    _import_peft()
    shape = attention_shape(model)
    total_heads = shape.num_layers * shape.num_heads
    counts = sorted({resolve_k(k, total_heads) for k in head_counts})
    methods = method_grid(families, counts, lora_ranks)
    # Before any training: 4-bit layers kept off bitsandbytes' repacking (the evaluations between runs would
    # repack them, and the next run could not train through them), and every PEFT row buildable.
    keep_4bit_layers_differentiable(model)
    check_peft_rows(model, methods)
    log = demo.Progress()
    with tempfile.TemporaryDirectory(prefix="lofit_compare_") as scratch:
        bench = ModelBench(model, tokenizer, train_rows, collator, eval_examples,
                           select_settings=select_settings, tune_settings=tune_settings, lora_lr=lora_lr,
                           ia3_lr=ia3_lr, scratch=scratch, training_args=training_args, backend=backend,
                           max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size,
                           chat_template=chat_template)
        base_accuracy = bench.accuracy(task)
        log(f"base accuracy on {task}: {base_accuracy:.3f}; {len(methods)} methods x {len(seeds)} seeds")
        runs = [Run(method, task, task, seed) for method in methods for seed in seeds]
        rankings, records = _execute(runs, bench, None, log, output_dir)
    rows = _rows(methods, task, list(seeds), records)
    results = {
        "lofit_fast_version": __version__, "machine": _machine(), "workers": 1,
        "task": {"name": task, "train_examples": len(train_rows), "eval_examples": len(eval_examples)},
        "base_model": {"name_or_path": getattr(model.config, "_name_or_path", None), "total_heads": total_heads},
        "base_accuracy": base_accuracy, "rows": rows, "verdicts": verdicts(rows), "transfer": None,
        "runs": list(records.values()), "rankings": _rankings_json(rankings),
        "settings": {"select": asdict(select_settings), "tune": asdict(tune_settings), "head_counts": counts,
                     "seeds": list(seeds), "families": list(families), "lora_ranks": list(lora_ranks),
                     "lora_lr": lora_lr, "ia3_lr": ia3_lr, "training_args": training_args or {}},
        "timings_s": {"total": log.elapsed(), "training_runs": sum(record["seconds"] for record in records.values())},
    }
    heading = f"exact match on {task}, {len(eval_examples)} held-out examples, {len(seeds)} seed(s)"
    title = f"{task} on {results['base_model']['name_or_path'] or 'your model'}, {len(seeds)} seed(s)"
    return _report(results, output_dir, title, heading)
