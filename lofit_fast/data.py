"""Task data: read the paper's three tasks (and generic JSON lines), tokenize, and batch.

    examples = load_task("clutrr", "train.json")          # [{"prompt", "completion", "answers"}, ...]
    rows = [tokenize_sft(example, tokenizer, max_length=512) for example in examples]
    batch = SFTCollator(tokenizer.pad_token_id)(rows[:8])  # input_ids / attention_mask / labels

Supervised tasks (clutrr, mquake, sft-jsonl) give `{"prompt", "completion", "answers"}`: `completion` is
what training targets, `answers` every string that exact-match evaluation accepts. Preference tasks
(truthfulqa, dpo-jsonl) give `{"prompt", "chosen", "rejected"}`. The prompt shapes are the LoFiT reference
code's (fc2869/lo-fit, utils/dataloaders.py); each loader's docstring says where we depart from it.

Malformed input raises ValueError naming the file, the line (1-based; for a JSON list, the item index
counted from 0) and the field, and what was expected there.
"""

import ast
import csv
import json
import os
from typing import Optional

import torch

from .losses import IGNORE_INDEX

SFT_TASKS = ("clutrr", "mquake", "sft-jsonl")
PREFERENCE_TASKS = ("truthfulqa", "dpo-jsonl")
TASKS = SFT_TASKS + PREFERENCE_TASKS


# ----------------------------------------------------------------------------------------------
# Reading records, with locations for error messages
# ----------------------------------------------------------------------------------------------

class _Record:
    """One row of a data file and where it came from ("line 7", "item 3"), for error messages."""

    def __init__(self, path: str, where: str, row):
        self.path, self.where, self.row = path, where, row

    def fail(self, message: str):
        raise ValueError(f"{self.path}, {self.where}: {message}")

    def field(self, name: str, expected: str = "a non-empty string", kind=str):
        """row[name], checked to be a `kind` (non-empty when it is a string)."""
        if not isinstance(self.row, dict):
            self.fail(f"expected a JSON object with field {name!r}, got {type(self.row).__name__}")
        if name not in self.row:
            self.fail(f"missing field {name!r} (expected {expected})")
        value = self.row[name]
        if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
            self.fail(f"field {name!r} is {_describe(value)}; expected {expected}")
        return value

    def string_list(self, name: str, required: bool = True) -> list:
        """row[name] as a list of non-empty strings ([] when absent and not required)."""
        if not required and isinstance(self.row, dict) and name not in self.row:
            return []
        values = self.field(name, "a list of non-empty strings", list)
        if not all(isinstance(value, str) and value.strip() for value in values):
            self.fail(f"field {name!r} holds {_describe(values)}; expected a list of non-empty strings")
        return values


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _open_text(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data file at {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give the data file itself (e.g. {os.path.join(path, 'train.json')})")
    with open(path, encoding="utf-8-sig") as file:  # -sig: tolerate a byte-order mark
        text = file.read()
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {_expected_format(path)}")
    return text


def _expected_format(path: str) -> str:
    return "a CSV file with a header row" if path.endswith(".csv") else "JSON lines or a JSON list of objects"


def read_json_records(path) -> list:
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
        return [_Record(path, f"item {index} (counted from 0)", item) for index, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                             f"expected one JSON object per line") from None
        records.append(_Record(path, f"line {number}", row))
    return records


def read_csv_records(path, columns: tuple) -> list:
    """The rows of a CSV file with a header, each checked to have `columns`; line numbers are the file's
    (the header is line 1; a quoted cell may span lines, so a row is named by the line it starts on)."""
    path = os.fspath(path)
    text = _open_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    missing = [column for column in columns if column not in header]
    if missing:
        raise ValueError(f"{path}, line 1: the header lacks column(s) {', '.join(map(repr, missing))}; "
                         f"expected columns {', '.join(map(repr, columns))} (found {header})")
    records, next_line = [], reader.line_num + 1
    for row in reader:
        records.append(_Record(path, f"line {next_line}", row))
        next_line = reader.line_num + 1
    if not records:
        raise ValueError(f"{path} has a header but no rows")
    return records


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


def load_clutrr(path) -> list:
    """CLUTRR (a JSON list of stories). Prompt: the reference code's template, ending in "... Answer:
    {second} is {first} 's" and a newline; completion and only answer: `target_text`, the relation word
    (e.g. "nephew": {second} is {first}'s nephew).

    Like the reference, the story is `clean_story` with the [brackets] around names removed (falling back
    to `story` when a file has no `clean_story`). `query` is "('first', 'second')"; unlike the reference,
    whose split kept a leading space on the second name, the names are stripped.
    """
    examples = []
    for record in read_json_records(path):
        story_field = "clean_story" if isinstance(record.row, dict) and "clean_story" in record.row else "story"
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
        record.fail(f"field 'query' is {text!r}; expected a pair of names written \"('first', 'second')\"")
    return names[0].strip(), names[1].strip()


def load_mquake(path, all_questions: bool = False) -> list:
    """MQuAKE (JSON lines, one counterfactual edit per line).

    Prompt: "Q: Imagine that {edited fact}. {question} A:", the edited fact being
    `requested_rewrite[0]["prompt"]` filled with its `subject`, a space, and `target_new.str`.
    Completion: `new_answer`; answers: `new_answer` and `new_answer_alias`.

    Each case carries three paraphrased multi-hop `questions`. The reference code trains and evaluates on
    the first question only (one example per case: 134 / 95 / 864 in the paper's splits), and so does
    this loader by default; `all_questions=True` makes one example per question. Every file in the paper's
    splits has exactly one requested rewrite per case; the first is used, as in the reference.
    """
    examples = []
    for record in read_json_records(path):
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


def _split_answers(record: _Record, column: str) -> list:
    """A TruthfulQA cell of '; '-separated answers as a list (blank parts dropped)."""
    answers = [answer.strip() for answer in (record.row.get(column) or "").split(";") if answer.strip()]
    if not answers:
        record.fail(f"column {column!r} is empty; expected one or more answers separated by '; '")
    return answers


def _cell(record: _Record, column: str) -> str:
    value = (record.row.get(column) or "").strip()
    if not value:
        record.fail(f"column {column!r} is empty; expected text")
    return value


def load_truthfulqa_pairs(path) -> list:
    """TruthfulQA preference pairs (CSV with Question, Best Answer, Incorrect Answers, '; '-separated).

    Prompt "Q: {question} A:". One pair per question, as the reference code builds them: chosen = the best
    answer, rejected = the first incorrect answer. (The reference pairs its chosen list, which holds the
    best answer only, with the incorrect answers and cuts both to the shorter length.)
    """
    examples = []
    for record in read_csv_records(path, ("Question", "Best Answer", "Incorrect Answers")):
        prompt = TRUTHFULQA_TEMPLATE.format(question=_cell(record, "Question"))
        examples.append({"prompt": prompt, "chosen": _cell(record, "Best Answer"),
                         "rejected": _split_answers(record, "Incorrect Answers")[0]})
    return examples


def load_truthfulqa_mc(path) -> list:
    """TruthfulQA for MC1/MC2: `{"prompt", "best", "correct", "incorrect"}` per question.

    As TruthfulQA's own evaluation does (`format_best`, `split_multi_answer`), every answer ends with a
    period (one is added where missing), and `correct` holds the best answer (put first if the
    Correct Answers cell lacks it).
    """
    examples = []
    for record in read_csv_records(path, TRUTHFULQA_COLUMNS):
        best = _close(_cell(record, "Best Answer"))
        correct = [_close(answer) for answer in _split_answers(record, "Correct Answers")]
        if best not in correct:
            correct.insert(0, best)
        examples.append({"prompt": TRUTHFULQA_TEMPLATE.format(question=_cell(record, "Question")), "best": best,
                         "correct": correct,
                         "incorrect": [_close(answer) for answer in _split_answers(record, "Incorrect Answers")]})
    return examples


def _close(answer: str) -> str:
    return answer if answer.endswith(".") else answer + "."


def load_sft_jsonl(path) -> list:
    """Generic supervised data: JSON lines (or a JSON list) of `{"prompt", "completion"}`, with an optional
    `answers` list of strings that evaluation accepts (default: the completion)."""
    examples = []
    for record in read_json_records(path):
        prompt = record.field("prompt")
        completion = record.field("completion")
        answers = record.string_list("answers", required=False) or [completion]
        examples.append({"prompt": prompt, "completion": completion, "answers": answers})
    return examples


def load_dpo_jsonl(path) -> list:
    """Generic preference data: JSON lines (or a JSON list) of `{"prompt", "chosen", "rejected"}`."""
    return [{"prompt": record.field("prompt"), "chosen": record.field("chosen"),
             "rejected": record.field("rejected")} for record in read_json_records(path)]


LOADERS = {"clutrr": load_clutrr, "mquake": load_mquake, "truthfulqa": load_truthfulqa_pairs,
           "sft-jsonl": load_sft_jsonl, "dpo-jsonl": load_dpo_jsonl}


def load_task(task: str, path) -> list:
    """The examples of `task` read from `path`: `{"prompt", "completion", "answers"}` for clutrr, mquake
    and sft-jsonl, `{"prompt", "chosen", "rejected"}` for truthfulqa and dpo-jsonl."""
    if task not in LOADERS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return LOADERS[task](path)


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------

def _prompt_and_completion_ids(prompt: str, completion: str, tokenizer) -> tuple:
    """Token ids of the prompt (with the tokenizer's special prefix, e.g. BOS) and of the completion.

    The completion is preceded by a space unless the prompt ends in whitespace. The prompt is tokenized
    on its own, exactly as generation will see it, so the prompt/answer boundary is exact. The
    completion's ids are the tail of the tokenized whole when that whole starts with the prompt's ids
    (the usual case): this is how the answer tokenizes after the prompt, and it avoids the stray
    word-start token that tokenizing " answer" alone gives with SentencePiece tokenizers (Llama, Gemma).
    When a token straddles the boundary (e.g. a prompt ending in a space that the answer's first word
    absorbs), the completion is tokenized on its own instead.
    """
    text = completion if not prompt or prompt[-1].isspace() else " " + completion
    prompt_ids = tokenizer(prompt)["input_ids"]
    whole_ids = tokenizer(prompt + text)["input_ids"]
    if whole_ids[:len(prompt_ids)] == prompt_ids and len(whole_ids) > len(prompt_ids):
        return list(prompt_ids), list(whole_ids[len(prompt_ids):])
    return list(prompt_ids), list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_sft(example: dict, tokenizer, max_length: int, add_eos: bool = True) -> dict:
    """`{"input_ids", "labels"}` (lists of ints) for prompt + completion; labels are -100 on the prompt.

    The completion ends with the tokenizer's EOS (`add_eos=False` leaves it off, for scoring answers).
    Longer than `max_length`: tokens are cut from the left of the prompt (after a leading BOS, which is
    kept), never from the answer; ValueError when the answer alone leaves no room for a prompt token.
    """
    prompt_ids, completion_ids = _prompt_and_completion_ids(example["prompt"], example["completion"], tokenizer)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and completion_ids[-1:] != [eos]:
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


def tokenize_preference(example: dict, tokenizer, max_length: int) -> dict:
    """`{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`, each side built by
    `tokenize_sft` from the shared prompt."""
    row = {}
    for side in ("chosen", "rejected"):
        encoded = tokenize_sft({"prompt": example["prompt"], "completion": example[side]}, tokenizer, max_length)
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
