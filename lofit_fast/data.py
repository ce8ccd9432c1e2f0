"""Task data: read the paper's three tasks and your own, tokenize (optionally through a chat template), and batch.

    examples = load_task("clutrr", "train.json")          # [{"prompt", "completion", "answers"}, ...]
    examples = load_task("sft", "my_data.parquet", fields={"prompt": "question", "completion": "answer"})
    rows = [tokenize_sft(example, tokenizer, max_length=512) for example in examples]
    batch = SFTCollator(tokenizer.pad_token_id)(rows[:8])  # input_ids / attention_mask / labels
    subset = training_subset(examples, 300, seed=42)       # the paper's seeded CLUTRR training subset

Sources: a JSON-lines, JSON, CSV or parquet file; a directory written by `datasets`' `save_to_disk`; a
`datasets.Dataset`; or the name of a dataset on the Hugging Face Hub (`split=` picks the split of a
DatasetDict or a Hub dataset). `fields` renames: {the task's field: your column}.

Supervised tasks (clutrr, mquake, sft) give `{"prompt", "completion", "answers"}`: `completion` is what
training targets, `answers` every string that exact-match evaluation accepts. Preference tasks (truthfulqa,
dpo) give `{"prompt", "chosen", "rejected"}`. The prompt shapes are the LoFiT reference code's (fc2869/lo-fit,
utils/dataloaders.py); each loader's docstring says where we depart from it.

Malformed input raises ValueError naming the source, the row (a file's line, 1-based; for a JSON list or a
dataset, the item index counted from 0) and the field, and what was expected there.
"""

import ast
import csv
import json
import os
import random
import warnings
from typing import Optional

import torch

from .losses import IGNORE_INDEX

SFT_TASKS = ("clutrr", "mquake", "sft")
PREFERENCE_TASKS = ("truthfulqa", "dpo")
TASKS = SFT_TASKS + PREFERENCE_TASKS
# Earlier names of the generic tasks, from when they read JSON lines only; still accepted.
TASK_ALIASES = {"sft-jsonl": "sft", "dpo-jsonl": "dpo"}


# ----------------------------------------------------------------------------------------------
# Reading records, with locations for error messages
# ----------------------------------------------------------------------------------------------

class _Record:
    """One row of a data source and where it came from ("line 7", "item 3"), for error messages. `fields`
    maps the names the loaders ask for to the row's own column names."""

    def __init__(self, path: str, where: str, row, fields: Optional[dict] = None):
        self.path, self.where, self.row, self.fields = path, where, row, fields or {}

    def fail(self, message: str):
        raise ValueError(f"{self.path}, {self.where}: {message}")

    def column(self, name: str) -> str:
        """The row's column that holds the loader's field `name`."""
        return self.fields.get(name, name)

    def has(self, name: str) -> bool:
        return isinstance(self.row, dict) and self.column(name) in self.row

    def field(self, name: str, expected: str = "a non-empty string", kind=str):
        """The field `name` (column `fields.get(name, name)`), checked to be a `kind` (non-empty when a string)."""
        column = self.column(name)
        label = repr(column) if column == name else f"{column!r} (the {name} field)"
        if not isinstance(self.row, dict):
            self.fail(f"expected a JSON object with field {label}, got {type(self.row).__name__}")
        if column not in self.row:
            self.fail(f"missing field {label} (expected {expected})")
        value = self.row[column]
        if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
            self.fail(f"field {label} is {_describe(value)}; expected {expected}")
        return value

    def string_list(self, name: str, required: bool = True) -> list:
        """The field `name` as a list of non-empty strings ([] when absent and not required)."""
        if not required and not self.has(name):
            return []
        values = self.field(name, "a list of non-empty strings", list)
        if not all(isinstance(value, str) and value.strip() for value in values):
            self.fail(f"field {self.column(name)!r} holds {_describe(values)}; expected a list of non-empty strings")
        return values


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def read_records(source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """The rows of `source`, each with its location for error messages: a JSON-lines / JSON file (a `.jsonl`
    file is JSON lines, any other a JSON list when it starts with '['), a CSV file with a header, a parquet
    file, a directory written by `datasets`' `save_to_disk`, a `datasets.Dataset`, or a Hugging Face Hub
    dataset name, `NAME:CONFIG` for one with several configs. `split` picks the split of a saved DatasetDict or of
    a Hub dataset (default "train")."""
    if _is_dataset(source):
        if hasattr(source, "keys"):  # a DatasetDict
            source = _pick_split(source, split, f"the {type(source).__name__} given")
        return _dataset_records(source, f"the {type(source).__name__} given", fields)
    path = os.fspath(source)
    if os.path.isdir(path):
        return _dataset_records(_load_from_disk(path, split), path, fields)
    if split is not None and os.path.isfile(path):
        raise ValueError(f"split={split!r} applies to a datasets directory or a Hub dataset; {path} is a file, "
                         f"which is one split already")
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return read_csv_records(path, fields)
    if os.path.isfile(path) and path.lower().endswith(".parquet"):
        return _dataset_records(_read_parquet(path), path, fields)
    if os.path.isfile(path) or not _looks_like_hub_name(path):
        return read_json_records(path, fields)
    return _dataset_records(_load_hub_dataset(path, split), f"{path} (Hugging Face Hub)", fields)


def _is_dataset(source) -> bool:
    return type(source).__module__.startswith("datasets.") and hasattr(source, "column_names")


def _looks_like_hub_name(text: str) -> bool:
    """'name' or 'owner/name' (optionally ':config'), without a data file's suffix or a path's leading '.', '/'
    or '~'."""
    name, _, config = text.partition(":")
    parts = name.split("/")
    return (0 < len(parts) <= 2 and all(part and part[0] not in ".~" for part in parts) and ":" not in config
            and not name.lower().endswith((".json", ".jsonl", ".csv", ".parquet")))


def _dataset_records(dataset, where: str, fields: Optional[dict]) -> list:
    if len(dataset) == 0:
        raise ValueError(f"{where} has no rows")
    return [_Record(where, f"row {index} (counted from 0)", dict(row), fields) for index, row in enumerate(dataset)]


def _load_from_disk(path: str, split: Optional[str]):
    """The Dataset saved in `path` by `save_to_disk` (a DatasetDict's `split`)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")):
        saved = sorted(name for name in os.listdir(path)
                       if os.path.isfile(os.path.join(path, name, "state.json")))
        hint = (f"; its subdirectories {saved} were written by save_to_disk: give one of them" if saved else
                ", or a directory written by datasets' save_to_disk")
        raise ValueError(f"{path} is a directory; give the data file itself (e.g. "
                         f"{os.path.join(path, 'train.json')}){hint}")
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises several types for a damaged directory
        raise ValueError(f"{path} could not be read with datasets.load_from_disk ({type(error).__name__}: "
                         f"{error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, path)
    if split is not None:
        raise ValueError(f"split={split!r} was given, but {path} holds a single dataset, not a DatasetDict")
    return loaded


def _pick_split(dataset_dict, split: Optional[str], where: str):
    splits = list(dataset_dict)
    if split is None and len(splits) == 1:
        return dataset_dict[splits[0]]
    if split not in dataset_dict:
        asked = "no split was given" if split is None else f"there is no split {split!r}"
        raise ValueError(f"{where} holds the splits {splits} and {asked}; choose one (split=..., --split ...)")
    return dataset_dict[split]


def _read_parquet(path: str):
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow's ArrowInvalid and OSError for damaged files
        raise ValueError(f"{path} is not a readable parquet file ({type(error).__name__}: {error})") from None


def _load_hub_dataset(source: str, split: Optional[str]):
    """`owner/name` or `owner/name:config` from the Hub (e.g. `truthfulqa/truthful_qa:generation`, whose only
    split is "validation")."""
    import datasets

    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # offline, unknown name, config missing, no such split, ...
        raise ValueError(f"there is no file or directory {source!r}, and loading it as a Hugging Face Hub dataset "
                         f"(config {config or None!r}, split {split or 'train'!r}) failed: {type(error).__name__}: "
                         f"{error}. A dataset with several configs is named NAME:CONFIG; --split / split= picks "
                         f"the split") from None


def _open_text(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data file at {path}")
    with open(path, encoding="utf-8-sig") as file:  # -sig: tolerate a byte-order mark
        text = file.read()
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {_expected_format(path)}")
    return text


def _expected_format(path: str) -> str:
    return "a CSV file with a header row" if path.endswith(".csv") else "JSON lines or a JSON list of objects"


def read_json_records(path, fields: Optional[dict] = None) -> list:
    """The objects of a JSON-lines file (blank lines skipped) or of a JSON list. A `.jsonl` file is JSON
    lines; any other is a JSON list when its first character is '['. Each object comes with its location
    for error messages."""
    path = os.fspath(path)
    text = _open_text(path)
    if not path.endswith(".jsonl") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}); "
                             f"expected a JSON list of objects") from None
        return [_Record(path, f"item {index} (counted from 0)", item, fields) for index, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                             f"expected one JSON object per line") from None
        records.append(_Record(path, f"line {number}", row, fields))
    return records


def read_csv_records(path, fields: Optional[dict] = None) -> list:
    """The rows of a CSV file with a header; line numbers are the file's (the header is line 1; a quoted cell
    may span lines, so a row is named by the line it starts on)."""
    path = os.fspath(path)
    text = _open_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    reader.fieldnames  # reads the header, so that line_num counts from it
    records, next_line = [], reader.line_num + 1
    for row in reader:
        records.append(_Record(path, f"line {next_line}", row, fields))
        next_line = reader.line_num + 1
    if not records:
        raise ValueError(f"{path} has a header but no rows")
    return records


def require_columns(records: list, names: tuple) -> None:
    """ValueError unless the first row of a table (CSV, parquet, dataset) has the columns of the fields
    `names` (renamed by the records' `fields`)."""
    first = records[0]
    if not isinstance(first.row, dict):
        return
    missing = [first.column(name) for name in names if not first.has(name)]
    if missing:
        expected = ", ".join(repr(first.column(name)) for name in names)
        where = "line 1: the header" if first.path.lower().endswith(".csv") else "the table"
        raise ValueError(f"{first.path}, {where} lacks column(s) {', '.join(map(repr, missing))}; expected "
                         f"columns {expected} (found {list(first.row)})")


# ----------------------------------------------------------------------------------------------
# Task loaders
# ----------------------------------------------------------------------------------------------

CLUTRR_TEMPLATE = (
    'Read the following story about a family. "{story}" Assume the relations described in the story are all '
    "true. Based on relations between the fictional characters in the story (assume the relations are all true) "
    "and your commonsense knowledge about family relationship, how is {second} related to {first}? "
    "Answer: {second} is {first} 's\n")
MQUAKE_TEMPLATE = "Q: Imagine that {edited_fact}. {question} A:"
TRUTHFULQA_TEMPLATE = "Q: {question} A:"


def load_clutrr(source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """CLUTRR (the paper's is a JSON list of stories; any source of `read_records`). Prompt: the reference code's
    template, ending in "... Answer: {second} is {first} 's" and a newline; completion and only answer:
    `target_text`, the relation word (e.g. "nephew": {second} is {first}'s nephew).

    Like the reference, the story is `clean_story` with the [brackets] around names removed (falling back
    to `story` when a file has no `clean_story`). `query` is "('first', 'second')"; unlike the reference,
    whose split kept a leading space on the second name, the names are stripped.
    """
    examples = []
    for record in read_records(source, fields, split):
        story_field = "clean_story" if record.has("clean_story") else "story"
        story = record.field(story_field).replace("[", "").replace("]", "")
        first, second = _clutrr_query(record)
        relation = record.field("target_text", "the relation word, a non-empty string").strip()
        prompt = CLUTRR_TEMPLATE.format(story=story.strip(), first=first, second=second)
        examples.append({"prompt": prompt, "completion": relation, "answers": [relation]})
    return examples


def _clutrr_query(record: _Record) -> tuple:
    text = record.field("query", "a pair of names written \"('first', 'second')\"")
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        names = None
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) and n.strip() for n in names)):
        record.fail(f"field {record.column('query')!r} is {text!r}; expected a pair of names written "
                    f"\"('first', 'second')\"")
    return names[0].strip(), names[1].strip()


def load_mquake(source, all_questions: bool = False, fields: Optional[dict] = None,
                split: Optional[str] = None) -> list:
    """MQuAKE (the paper's is JSON lines, one counterfactual edit per line; any source of `read_records`).

    Prompt: "Q: Imagine that {edited fact}. {question} A:", the edited fact being
    `requested_rewrite[0]["prompt"]` filled with its `subject`, a space, and `target_new.str`.
    Completion: `new_answer`; answers: `new_answer` and `new_answer_alias`.

    Each case carries three paraphrased multi-hop `questions`. The reference code trains and evaluates on
    the first question only (one example per case: 134 / 95 / 864 in the paper's splits), and so does
    this loader by default; `all_questions=True` makes one example per question. Every file in the paper's
    splits has exactly one requested rewrite per case; the first is used, as in the reference.
    """
    examples = []
    for record in read_records(source, fields, split):
        rewrites = record.field("requested_rewrite", "a non-empty list of rewrites", list)
        if not rewrites or not isinstance(rewrites[0], dict):
            record.fail(f"field 'requested_rewrite' is {_describe(rewrites)}; expected a non-empty list of "
                        f"objects with 'prompt', 'subject' and 'target_new'")
        edited_fact = _mquake_edited_fact(record, rewrites[0])
        questions = record.string_list("questions")
        if not questions:
            record.fail("field 'questions' is empty; expected at least one question")
        answers = [record.field("new_answer")] + record.string_list("new_answer_alias", required=False)
        for question in questions if all_questions else questions[:1]:
            prompt = MQUAKE_TEMPLATE.format(edited_fact=edited_fact, question=question.strip())
            examples.append({"prompt": prompt, "completion": answers[0], "answers": answers})
    return examples


def _mquake_edited_fact(record: _Record, rewrite: dict) -> str:
    template, subject = rewrite.get("prompt"), rewrite.get("subject")
    target_new = rewrite.get("target_new")
    new_object = target_new.get("str") if isinstance(target_new, dict) else None
    if not (isinstance(template, str) and "{}" in template):
        record.fail(f"field 'requested_rewrite[0].prompt' is {_describe(template)}; "
                    f"expected a string with '{{}}' where the subject goes")
    for name, value in (("subject", subject), ("target_new.str", new_object)):
        if not (isinstance(value, str) and value.strip()):
            record.fail(f"field 'requested_rewrite[0].{name}' is {_describe(value)}; expected a non-empty string")
    return template.format(subject) + " " + new_object


TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
# The same fields in the Hugging Face Hub's TruthfulQA ("generation" configuration), answers as lists.
TRUTHFULQA_HUB_FIELDS = {"Question": "question", "Best Answer": "best_answer", "Correct Answers": "correct_answers",
                         "Incorrect Answers": "incorrect_answers"}


def _truthfulqa_records(source, columns: tuple, fields: Optional[dict], split: Optional[str]) -> list:
    """TruthfulQA's rows, with the CSV's column names or, where a table has those instead, the Hub's."""
    records = read_records(source, fields, split)
    if fields is None and not records[0].has("Question") and isinstance(records[0].row, dict) \
            and all(hub in records[0].row for hub in TRUTHFULQA_HUB_FIELDS.values()):
        for record in records:
            record.fields = TRUTHFULQA_HUB_FIELDS
    require_columns(records, columns)
    return records


def _split_answers(record: _Record, name: str) -> list:
    """A TruthfulQA field of answers: a '; '-separated cell, or a list; blank parts dropped."""
    value = record.row.get(record.column(name))
    parts = value if isinstance(value, list) else (value or "").split(";")
    answers = [answer.strip() for answer in parts if isinstance(answer, str) and answer.strip()]
    if not answers:
        record.fail(f"column {record.column(name)!r} is empty; expected one or more answers separated by '; '")
    return answers


def _cell(record: _Record, name: str) -> str:
    value = record.row.get(record.column(name))
    value = value.strip() if isinstance(value, str) else ""
    if not value:
        record.fail(f"column {record.column(name)!r} is empty; expected text")
    return value


def load_truthfulqa_pairs(source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """TruthfulQA preference pairs (the paper's CSV with Question, Best Answer, Incorrect Answers,
    '; '-separated; or any source of `read_records`, also with the Hub dataset's column names).

    Prompt "Q: {question} A:". One pair per question, as the reference code builds them: chosen = the best
    answer, rejected = the first incorrect answer. (The reference pairs its chosen list, which holds the
    best answer only, with the incorrect answers and cuts both to the shorter length.)
    """
    examples = []
    for record in _truthfulqa_records(source, ("Question", "Best Answer", "Incorrect Answers"), fields, split):
        prompt = TRUTHFULQA_TEMPLATE.format(question=_cell(record, "Question"))
        examples.append({"prompt": prompt, "chosen": _cell(record, "Best Answer"),
                         "rejected": _split_answers(record, "Incorrect Answers")[0]})
    return examples


def load_truthfulqa_mc(source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """TruthfulQA for MC1/MC2: `{"question", "prompt", "best", "correct", "incorrect"}` per question.

    As TruthfulQA's own evaluation does (`format_best`, `split_multi_answer`), every answer ends with a
    period (one is added where missing), and `correct` holds the best answer (put first if the
    Correct Answers cell lacks it).
    """
    examples = []
    for record in _truthfulqa_records(source, TRUTHFULQA_COLUMNS, fields, split):
        best = _close(_cell(record, "Best Answer"))
        correct = [_close(answer) for answer in _split_answers(record, "Correct Answers")]
        if best not in correct:
            correct.insert(0, best)
        question = _cell(record, "Question")
        examples.append({"question": question, "prompt": TRUTHFULQA_TEMPLATE.format(question=question),
                         "best": best, "correct": correct,
                         "incorrect": [_close(answer) for answer in _split_answers(record, "Incorrect Answers")]})
    return examples


def _close(answer: str) -> str:
    return answer if answer.endswith(".") else answer + "."


def load_sft(source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """Your supervised data: rows of `{"prompt", "completion"}` from any source of `read_records` (columns
    renamed by `fields`), with an optional `answers` list of strings that evaluation accepts (default: the
    completion)."""
    examples = []
    for record in read_records(source, fields, split):
        prompt = record.field("prompt")
        completion = record.field("completion")
        answers = record.string_list("answers", required=False) or [completion]
        examples.append({"prompt": prompt, "completion": completion, "answers": answers})
    return examples


def load_dpo(source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """Your preference data: rows of `{"prompt", "chosen", "rejected"}` from any source of `read_records`
    (columns renamed by `fields`)."""
    return [{"prompt": record.field("prompt"), "chosen": record.field("chosen"),
             "rejected": record.field("rejected")} for record in read_records(source, fields, split)]


LOADERS = {"clutrr": load_clutrr, "mquake": load_mquake, "truthfulqa": load_truthfulqa_pairs, "sft": load_sft,
           "dpo": load_dpo}
# The fields each task reads, which `fields` may rename.
TASK_FIELDS = {"clutrr": ("clean_story", "story", "query", "target_text"),
               "mquake": ("requested_rewrite", "questions", "new_answer", "new_answer_alias"),
               "truthfulqa": TRUTHFULQA_COLUMNS, "sft": ("prompt", "completion", "answers"),
               "dpo": ("prompt", "chosen", "rejected")}


def training_subset(examples: list, size: Optional[int], seed: int) -> list:
    """`size` examples drawn with `random.Random(seed).sample`, in the order drawn; all of them (the list
    itself) when `size` is None or 0. This is the paper's `--train_size` draw: lofit_trainer.py seeds Python's
    `random` with `--seed` and the loader calls `random.sample(train, train_size)` before anything else
    draws from it. A size above the number of examples keeps them all, with a warning."""
    if not size:
        return examples
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"train_size must be a number of examples (0 or None: all of them), not {size!r}")
    if size >= len(examples):
        if size > len(examples):
            warnings.warn(f"train_size={size} but there are only {len(examples)} training examples: all are used",
                          stacklevel=2)
        return examples
    # Drawn as indices, the same draw as sampling the list itself, so any sequence (a datasets.Dataset) works.
    return [examples[index] for index in random.Random(seed).sample(range(len(examples)), size)]


def canonical_task(task: str) -> str:
    """The task's name ("sft-jsonl" and "dpo-jsonl" are the earlier names of "sft" and "dpo"); ValueError for
    an unknown one."""
    task = TASK_ALIASES.get(task, task)
    if task not in LOADERS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return task


def load_task(task: str, source, fields: Optional[dict] = None, split: Optional[str] = None) -> list:
    """The examples of `task` read from `source`: `{"prompt", "completion", "answers"}` for clutrr, mquake
    and sft, `{"prompt", "chosen", "rejected"}` for truthfulqa and dpo.

    Args:
        task: "clutrr", "mquake", "truthfulqa", "sft" or "dpo".
        source: a JSON-lines / JSON / CSV / parquet file, a `save_to_disk` directory, a `datasets.Dataset`,
            or a Hugging Face Hub dataset name (see `read_records`).
        fields: {the task's field: your column}, e.g. {"prompt": "question", "completion": "answer"}; the
            task's fields are in `TASK_FIELDS`.
        split: the split of a saved DatasetDict or of a Hub dataset (Hub default: "train").
    """
    task = canonical_task(task)
    if fields:
        unknown = sorted(set(fields) - set(TASK_FIELDS[task]))
        if unknown:
            raise ValueError(f"task {task!r} has no field(s) {unknown} to rename; its fields are "
                             f"{list(TASK_FIELDS[task])}")
    return LOADERS[task](source, fields=fields or None, split=split)


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------

# Template variables set for every conversation: thinking off, so that a reasoning model's template (Qwen3's)
# writes its empty think block into the prompt, where the model reads it, not into the answer it is trained on
# or asked to generate. Templates without the variable ignore it.
CHAT_TEMPLATE_VARIABLES = {"enable_thinking": False}


def chat_prompt(prompt: str, tokenizer) -> str:
    """`prompt` as the user's turn of the tokenizer's chat template, up to where the assistant's answer
    starts (`add_generation_prompt=True`, thinking off: `CHAT_TEMPLATE_VARIABLES`). ValueError when the
    tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template (tokenizer.chat_template is None); "
                         f"leave chat templates off (--chat-template) for this tokenizer, or use the tokenizer of "
                         f"a chat model")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, **CHAT_TEMPLATE_VARIABLES)


def chat_completion(prompt: str, completion: str, tokenizer) -> str:
    """What the chat template writes after `chat_prompt(prompt)` for the assistant's turn `completion`: the
    answer and the template's end of turn."""
    return _chat_turns(prompt, completion, tokenizer)[1]


def _chat_turns(prompt: str, completion: str, tokenizer) -> tuple[str, str]:
    """(`chat_prompt(prompt)`, `chat_completion(prompt, completion)`), the template rendered once for each."""
    head = chat_prompt(prompt, tokenizer)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": completion}], tokenize=False,
                                          **CHAT_TEMPLATE_VARIABLES)
    if not whole.startswith(head):
        raise ValueError("the tokenizer's chat template writes the user's turn differently when an answer follows "
                         "it, so where the answer starts is not known; train without --chat-template")
    return head, whole[len(head):]


def _prompt_and_completion_ids(prompt: str, completion: str, tokenizer, chat_template: bool = False,
                               end_turn: bool = True) -> tuple:
    """Token ids of the prompt (with the tokenizer's special prefix, e.g. BOS) and of the completion.

    With `chat_template`, the prompt is the user's turn of the tokenizer's chat template and the completion the
    assistant's turn (`chat_prompt`, `chat_completion`; with `end_turn=False` the answer alone, the turn left
    open); the template writes its own special tokens, so the tokenizer adds none.

    The text is `prompt + completion`, with nothing put between them, as the paper trains (MQuAKE's text is
    prompt + answer, TRL's DPOTrainer tokenizes prompt + chosen) and as TRL joins prompt-completion data:
    a separator belongs in the data ("Q: ... A:" + "Rome" trains "A:Rome"). The prompt is tokenized on its
    own, exactly as generation will see it, so the prompt/answer boundary is exact. The completion's ids
    are the tail of the tokenized whole when that whole starts with the prompt's ids (the usual case): this
    is how the answer tokenizes after the prompt, and it avoids the stray word-start token that tokenizing
    " answer" alone gives with SentencePiece tokenizers (Llama, Gemma). When a token straddles the boundary
    (e.g. a prompt ending in a space that the answer's first word absorbs), the completion is tokenized on
    its own instead.
    """
    special = not chat_template
    if chat_template and end_turn:
        prompt, completion = _chat_turns(prompt, completion, tokenizer)
    elif chat_template:
        prompt = chat_prompt(prompt, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    whole_ids = tokenizer(prompt + completion, add_special_tokens=special)["input_ids"]
    if whole_ids[:len(prompt_ids)] == prompt_ids and len(whole_ids) > len(prompt_ids):
        return list(prompt_ids), list(whole_ids[len(prompt_ids):])
    return list(prompt_ids), list(tokenizer(completion, add_special_tokens=False)["input_ids"])


def tokenize_sft(example: dict, tokenizer, max_length: int, add_eos: bool = True, chat_template: bool = False) -> dict:
    """`{"input_ids", "labels"}` (lists of ints) for prompt + completion; labels are -100 on the prompt.

    The completion ends with the tokenizer's EOS (`add_eos=False` leaves it off, for scoring answers).
    With `chat_template`, prompt and completion are the user's and the assistant's turns of the tokenizer's
    chat template, the loss still on the answer only; the template's end of turn takes the place of the EOS
    (and is left off with `add_eos=False`). Longer than `max_length`: tokens are cut from the left of the prompt
    (after a leading BOS, which is kept), never from the answer; ValueError when the answer alone leaves no room
    for a prompt token.
    """
    prompt_ids, completion_ids = _prompt_and_completion_ids(example["prompt"], example["completion"], tokenizer,
                                                            chat_template, end_turn=add_eos)
    eos = tokenizer.eos_token_id
    if add_eos and not chat_template and eos is not None and completion_ids[-1:] != [eos]:
        completion_ids.append(eos)
    keep = max_length - len(completion_ids)
    if keep < 1:
        raise ValueError(f"the answer {example['completion'][:50]!r} is {len(completion_ids)} tokens, which leaves "
                         f"no room for the prompt in max_length={max_length}; raise max_length (--max-length)")
    if len(prompt_ids) > keep:
        bos = tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] and keep > 1 else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (keep - len(head)):]
    return {"input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def tokenize_preference(example: dict, tokenizer, max_length: int, chat_template: bool = False) -> dict:
    """`{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`, each side built by
    `tokenize_sft` from the shared prompt."""
    row = {}
    for side in ("chosen", "rejected"):
        encoded = tokenize_sft({"prompt": example["prompt"], "completion": example[side]}, tokenizer, max_length,
                               chat_template=chat_template)
        row[f"{side}_input_ids"], row[f"{side}_labels"] = encoded["input_ids"], encoded["labels"]
    return row


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------

def pad_sequences(rows: list, prefix: str, pad_id: int) -> dict:
    """Right-pad `rows[i][prefix + "input_ids"]` and `... "labels"` into a batch: `{prefix}input_ids`
    (padded with `pad_id`), `{prefix}attention_mask` (1 on tokens) and `{prefix}labels` (-100 on padding)."""
    ids = [torch.as_tensor(row[f"{prefix}input_ids"], dtype=torch.long) for row in rows]
    labels = [torch.as_tensor(row[f"{prefix}labels"], dtype=torch.long) for row in rows]
    length = max(len(sequence) for sequence in ids)
    batch_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    batch_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (sequence, label) in enumerate(zip(ids, labels)):
        if len(label) != len(sequence):
            raise ValueError(f"row {i}: {prefix}input_ids has {len(sequence)} tokens but {prefix}labels {len(label)}")
        batch_ids[i, :len(sequence)] = sequence
        batch_labels[i, :len(sequence)] = label
        mask[i, :len(sequence)] = 1
    return {f"{prefix}input_ids": batch_ids, f"{prefix}attention_mask": mask, f"{prefix}labels": batch_labels}


class SFTCollator:
    """Batches `tokenize_sft` rows: input_ids, attention_mask, labels (right padding, -100 on padding)."""

    def __init__(self, pad_id: Optional[int]):
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.pad_id = pad_id

    def __call__(self, rows: list) -> dict:
        return pad_sequences(rows, "", self.pad_id)


class PreferenceCollator(SFTCollator):
    """Batches `tokenize_preference` rows: chosen_* and rejected_* input_ids / attention_mask / labels, and
    the DPO reference log-probabilities `ref_chosen_logps` / `ref_rejected_logps` as fp32 (batch,) tensors
    when the rows carry them (`training.with_reference_logprobs` adds them)."""

    def __call__(self, rows: list) -> dict:
        batch = {**pad_sequences(rows, "chosen_", self.pad_id), **pad_sequences(rows, "rejected_", self.pad_id)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            present = sum(key in row for row in rows)
            if present and present != len(rows):
                raise ValueError(f"{present} of {len(rows)} rows carry {key!r}; give it to all rows or none")
            if present:
                batch[key] = torch.tensor([float(row[key]) for row in rows], dtype=torch.float32)
        return batch
