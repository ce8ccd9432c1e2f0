"""Task loaders, tokenization, collators and evaluation, on small rows written by each test.

The rows copy the shapes of the paper's files (CLUTRR: a JSON list; MQuAKE: JSON lines; TruthfulQA: CSV
with '; '-separated answers), so the loaders are checked on the real formats without shipping the data.
"""

import csv
import json
import math

import pytest
import torch

from lofit_fast import evaluation
from lofit_fast.data import (
    TASKS,
    PreferenceCollator,
    SFTCollator,
    load_mquake,
    load_task,
    load_truthfulqa_mc,
    tokenize_preference,
    tokenize_sft,
)
from lofit_fast.evaluation import evaluate_generation, is_correct, truthfulqa_mc_scores

from helpers import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()



# ----------------------------------------------------------------------------------------------
# Rows in the paper's formats
# ----------------------------------------------------------------------------------------------

def clutrr_row(first="Anna", second="Bob", relation="son", **changes):
    row = {"id": "x", "story": f"[{second}] is the son of [{first}]. They like apples.",
           "clean_story": f"[{first}] likes apples. [{second}] is the son of [{first}].",
           "query": f"('{first}', '{second}')", "target": 9, "target_text": relation, "task_name": "task_1.2"}
    row.update(changes)
    return row


def mquake_row(**changes):
    row = {"case_id": 18,
           "requested_rewrite": [{"prompt": "The name of the current head of the {} government is",
                                  "subject": "Nigeria", "relation_id": "P6",
                                  "target_new": {"id": "Q1", "str": "Karl Döhler"},
                                  "target_true": {"id": "Q2", "str": "Muhammadu Buhari"}}],
           "questions": ["Who was the head of government of the country where Ahmadu Bello was a citizen?",
                         "In what country was the person who Ahmadu Bello worked under a citizen?",
                         "What is the name of the head of government under whom Ahmadu Bello worked?"],
           "answer": "Muhammadu Buhari", "answer_alias": ["Baba Buhari"],
           "new_answer": "Karl Döhler", "new_answer_alias": ["Karl Doehler", "K. Döhler"]}
    row.update(changes)
    return row


TRUTHFULQA_HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


def truthfulqa_row(question="Can pigs fly?", best="No, pigs cannot fly",
                   correct="No, pigs cannot fly; No, pigs cannot fly on their own",
                   incorrect="Yes, pigs can fly; Yes, pigs fly south"):
    return ["Adversarial", "Proverbs", question, best, correct, incorrect, "https://example.org"]


def write_json_list(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_json_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path, rows, header=TRUTHFULQA_HEADER):
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------
# Loaders: paper prompt shapes
# ----------------------------------------------------------------------------------------------

def test_clutrr_prompt_is_the_papers(tmp_path):
    path = write_json_list(tmp_path / "train.json", [clutrr_row(), clutrr_row("Cleo", "Roy", "nephew")])
    examples = load_task("clutrr", path)
    assert len(examples) == 2
    assert examples[0] == {
        "prompt": 'Read the following story about a family. "Anna likes apples. Bob is the son of Anna." Assume '
                  "the relations described in the story are all true. Based on relations between the fictional "
                  "characters in the story (assume the relations are all true) and your commonsense knowledge "
                  "about family relationship, how is Bob related to Anna? Answer: Bob is Anna 's\n",
        "completion": "son", "answers": ["son"]}
    assert examples[1]["prompt"].endswith("how is Roy related to Cleo? Answer: Roy is Cleo 's\n")
    assert examples[1]["completion"] == "nephew"


def test_clutrr_falls_back_to_story_without_clean_story(tmp_path):
    row = clutrr_row()
    del row["clean_story"]
    [example] = load_task("clutrr", write_json_list(tmp_path / "c.json", [row]))
    assert '"Bob is the son of Anna. They like apples."' in example["prompt"]


def test_mquake_prompt_is_the_papers_first_question(tmp_path):
    path = write_json_lines(tmp_path / "train.jsonl", [mquake_row(), mquake_row(new_answer_alias=[])])
    examples = load_task("mquake", path)
    assert len(examples) == 2  # one example per case: the first question, as the reference code trains
    assert examples[0] == {
        "prompt": "Q: Imagine that The name of the current head of the Nigeria government is Karl Döhler. "
                  "Who was the head of government of the country where Ahmadu Bello was a citizen? A:",
        "completion": "Karl Döhler", "answers": ["Karl Döhler", "Karl Doehler", "K. Döhler"]}
    assert examples[1]["answers"] == ["Karl Döhler"]
    every_question = load_mquake(path, all_questions=True)
    assert len(every_question) == 6
    assert every_question[2]["prompt"].endswith("under whom Ahmadu Bello worked? A:")


def test_truthfulqa_pairs_are_best_against_first_incorrect(tmp_path):
    rows = [truthfulqa_row(), truthfulqa_row("Is it\nraining?", "It depends", "It depends; I have no comment",
                                             "Yes, always; No, never")]
    examples = load_task("truthfulqa", write_csv(tmp_path / "fold_0_train.csv", rows))
    assert examples == [
        {"prompt": "Q: Can pigs fly? A:", "chosen": "No, pigs cannot fly", "rejected": "Yes, pigs can fly"},
        {"prompt": "Q: Is it\nraining? A:", "chosen": "It depends", "rejected": "Yes, always"}]


def test_truthfulqa_mc_answers_are_closed_with_a_period_and_include_best(tmp_path):
    rows = [truthfulqa_row(), truthfulqa_row("Q2?", best="Best one", correct="Other true.", incorrect="False one.")]
    examples = load_truthfulqa_mc(write_csv(tmp_path / "test.csv", rows))
    assert examples[0] == {"question": "Can pigs fly?", "prompt": "Q: Can pigs fly? A:", "best": "No, pigs cannot fly.",
                           "correct": ["No, pigs cannot fly.", "No, pigs cannot fly on their own."],
                           "incorrect": ["Yes, pigs can fly.", "Yes, pigs fly south."]}
    assert examples[1]["correct"] == ["Best one.", "Other true."]  # best missing from Correct Answers: put first
    assert examples[1]["incorrect"] == ["False one."]


def test_generic_jsonl_tasks(tmp_path):
    sft = write_json_lines(tmp_path / "sft.jsonl", [{"prompt": "2+2=", "completion": "4"},
                                                    {"prompt": "Capital of Italy:", "completion": "Rome",
                                                     "answers": ["Rome", "Roma"]}])
    assert load_task("sft-jsonl", sft) == [{"prompt": "2+2=", "completion": "4", "answers": ["4"]},
                                           {"prompt": "Capital of Italy:", "completion": "Rome",
                                            "answers": ["Rome", "Roma"]}]
    dpo = write_json_lines(tmp_path / "dpo.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    assert load_task("dpo-jsonl", dpo) == [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    # a JSON list is read too
    as_list = write_json_list(tmp_path / "sft.json", [{"prompt": "a", "completion": "b"}])
    assert load_task("sft-jsonl", as_list) == [{"prompt": "a", "completion": "b", "answers": ["b"]}]


# ----------------------------------------------------------------------------------------------
# Loaders: bad input names the file, the line and the field
# ----------------------------------------------------------------------------------------------

def _lines(*rows):
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


BAD_FILES = [
    # (task, file name, content, words the message must contain)
    ("sft-jsonl", "a.jsonl", _lines({"prompt": "p", "completion": "c"}, "", {"prompt": "p"}),
     ["line 3", "missing field 'completion'"]),
    ("sft-jsonl", "b.jsonl", _lines({"prompt": "p", "completion": "c"}, '{"prompt": "p", completion}'),
     ["line 2", "not valid JSON"]),
    ("sft-jsonl", "c.jsonl", _lines({"prompt": "p", "completion": 5}), ["line 1", "'completion'", "int 5",
                                                                         "non-empty string"]),
    ("sft-jsonl", "d.jsonl", _lines({"prompt": "p", "completion": "c", "answers": "c"}),
     ["line 1", "'answers'", "list of non-empty strings"]),
    ("sft-jsonl", "e.jsonl", _lines(["p", "c"]), ["line 1", "expected a JSON object"]),
    ("dpo-jsonl", "f.jsonl", _lines({"prompt": "p", "chosen": "c"}), ["line 1", "missing field 'rejected'"]),
    ("dpo-jsonl", "g.jsonl", _lines({"prompt": "p", "chosen": " ", "rejected": "r"}), ["line 1", "'chosen'"]),
    ("clutrr", "h.json", json.dumps([clutrr_row(), {k: v for k, v in clutrr_row().items() if k != "target_text"}]),
     ["item 1", "missing field 'target_text'", "relation word"]),
    ("clutrr", "i.json", json.dumps([clutrr_row(query="Anna and Bob")]),
     ["item 0", "'query'", "('first', 'second')"]),
    ("clutrr", "j.json", '[{"story": "a",\n "query": }]', ["line 2", "not valid JSON", "JSON list"]),
    ("mquake", "k.jsonl", _lines(mquake_row(), {k: v for k, v in mquake_row().items() if k != "requested_rewrite"}),
     ["line 2", "missing field 'requested_rewrite'"]),
    ("mquake", "l.jsonl", _lines(mquake_row(requested_rewrite=[{"prompt": "no slot", "subject": "X",
                                                                 "target_new": {"str": "Y"}}])),
     ["line 1", "requested_rewrite[0].prompt", "'{}'"]),
    ("mquake", "m.jsonl", _lines(mquake_row(requested_rewrite=[{"prompt": "{} is", "subject": "X",
                                                                 "target_new": {}}])),
     ["line 1", "requested_rewrite[0].target_new.str"]),
    ("mquake", "n.jsonl", _lines(mquake_row(questions=[])), ["line 1", "'questions'", "at least one"]),
    ("mquake", "o.jsonl", _lines(mquake_row(new_answer_alias=[3])), ["line 1", "'new_answer_alias'"]),
]


@pytest.mark.parametrize("task, name, content, words", BAD_FILES, ids=[case[1] for case in BAD_FILES])
def test_bad_rows_name_file_line_and_field(tmp_path, task, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        load_task(task, path)
    message = str(caught.value)
    assert message.startswith(f"{path}, ")
    for word in words:
        assert word in message, message


def test_truthfulqa_bad_rows_name_the_line_and_column(tmp_path):
    # Row 1 spans lines 2-3 (a quoted newline), so the row with the empty cell starts on line 4.
    path = write_csv(tmp_path / "t.csv", [truthfulqa_row("Is it\nraining?"), truthfulqa_row(incorrect="")])
    with pytest.raises(ValueError, match=r"t\.csv, line 4: column 'Incorrect Answers' is empty"):
        load_task("truthfulqa", path)
    header = [column for column in TRUTHFULQA_HEADER if column != "Best Answer"]
    path = write_csv(tmp_path / "u.csv", [truthfulqa_row()[:3] + truthfulqa_row()[4:]], header=header)
    with pytest.raises(ValueError, match=r"u\.csv, line 1: the header lacks column\(s\) 'Best Answer'"):
        load_task("truthfulqa", path)
    path = write_csv(tmp_path / "v.csv", [truthfulqa_row(correct=" ; ")])
    with pytest.raises(ValueError, match=r"v\.csv, line 2: column 'Correct Answers' is empty"):
        load_truthfulqa_mc(path)


def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file at .*nothing.jsonl"):
        load_task("sft-jsonl", tmp_path / "nothing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_task("sft-jsonl", tmp_path / "empty.jsonl")
    write_csv(tmp_path / "header_only.csv", [])
    with pytest.raises(ValueError, match="has a header but no rows"):
        load_task("truthfulqa", tmp_path / "header_only.csv")
    with pytest.raises(ValueError, match="unknown task 'squad'.*" + ", ".join(TASKS)):
        load_task("squad", tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        load_task("clutrr", tmp_path)


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------

def test_tokenize_sft_masks_exactly_the_prompt(tokenizer):
    example = {"prompt": "Q: Can pigs fly? A:", "completion": " No, pigs cannot fly"}
    row = tokenize_sft(example, tokenizer, max_length=64)
    prompt_ids = tokenizer("Q: Can pigs fly? A:")["input_ids"]
    whole_ids = tokenizer("Q: Can pigs fly? A: No, pigs cannot fly")["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert whole_ids[:len(prompt_ids)] == prompt_ids  # the usual case: the prompt is a token prefix
    assert row["input_ids"] == whole_ids + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt_ids) + whole_ids[len(prompt_ids):] + [tokenizer.eos_token_id]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_sft({"prompt": "A:", "completion": "x"}, tokenizer, 64, add_eos=False)["input_ids"][-1] != 2


@pytest.mark.parametrize("task, prompt_end", [("mquake", "A:"), ("truthfulqa", "A:"), ("clutrr", "'s\n")])
def test_prompt_and_answer_join_as_the_paper_joins_them(tmp_path, tokenizer, task, prompt_end):
    """The paper trains on prompt + answer with nothing between: MQuAKE's text is prompt + new_answer, TRL 0.8's
    DPOTrainer tokenizes prompt + chosen, CLUTRR's prompt ends in a newline."""
    if task == "mquake":
        example = load_task(task, write_json_lines(tmp_path / "m.jsonl", [mquake_row()]))[0]
        answer = example["completion"]
    elif task == "truthfulqa":
        example = load_task(task, write_csv(tmp_path / "t.csv", [truthfulqa_row()]))[0]
        example, answer = {"prompt": example["prompt"], "completion": example["chosen"]}, example["chosen"]
    else:
        example = load_task(task, write_json_list(tmp_path / "c.json", [clutrr_row()]))[0]
        answer = example["completion"]
    assert example["prompt"].endswith(prompt_end)
    row = tokenize_sft(example, tokenizer, max_length=256)
    assert row["input_ids"] == tokenizer(example["prompt"] + answer)["input_ids"] + [tokenizer.eos_token_id]
    target = [token for token in row["labels"] if token != -100]
    assert tokenizer.decode(target, skip_special_tokens=True) == answer


def sentencepiece_like_tokenizer():
    """A unigram tokenizer that normalises text the way Llama's does (a '▁' prepended, spaces made '▁'), so
    " Rome" tokenized alone is ['▁', '▁Rome'] where after a prompt it is ['▁Rome']."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["▁Q", ":", "▁What", "▁is", "▁the", "▁capital", "?", "▁A", "▁Rome", "▁"]
    letters = sorted(set("".join(words)) - set(words))
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("<pad>", 0.0)]
    vocab += [(word, -1.0) for word in words] + [(letter, -5.0) for letter in letters]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_tokenize_sft_tokenizes_the_answer_as_it_follows_the_prompt():
    """With a SentencePiece-style tokenizer, tokenizing " Rome" on its own would train a stray '▁' token
    that the model never produces after "A:"; the answer's tokens are those of the whole text instead."""
    tokenizer = sentencepiece_like_tokenizer()
    prompt = "Q: What is the capital? A:"
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Rome", add_special_tokens=False)["input_ids"]) == ["▁", "▁Rome"]
    row = tokenize_sft({"prompt": prompt, "completion": " Rome"}, tokenizer, max_length=64)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert row["input_ids"] == prompt_ids + [tokenizer.convert_tokens_to_ids("▁Rome"), tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt_ids) + row["input_ids"][len(prompt_ids):]


def test_tokenize_sft_keeps_the_prompt_tokens_when_a_token_straddles_the_boundary(tokenizer):
    """'Q: Can ' ends in a space token that 'pigs' would absorb ('Ġpigs') when tokenized together: the prompt
    keeps its own tokens (what generation sees) and the completion is tokenized on its own."""
    prompt_ids = tokenizer("Q: Can ")["input_ids"]
    assert tokenizer("Q: Can pigs")["input_ids"][:len(prompt_ids)] != prompt_ids
    row = tokenize_sft({"prompt": "Q: Can ", "completion": "pigs"}, tokenizer, max_length=64)
    completion_ids = tokenizer("pigs", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]


def test_tokenize_sft_truncates_the_prompt_from_the_left_keeping_bos(tokenizer):
    example = {"prompt": "Q: Imagine that The capital of France is Rome. What is the capital? A:",
               "completion": "Rome"}
    full = tokenize_sft(example, tokenizer, max_length=512)
    answer_length = sum(label != -100 for label in full["labels"])
    row = tokenize_sft(example, tokenizer, max_length=answer_length + 4)
    assert len(row["input_ids"]) == answer_length + 4
    assert row["input_ids"][0] == tokenizer.bos_token_id
    # BOS, then the last 3 prompt tokens, then the whole answer
    assert row["input_ids"][1:] == full["input_ids"][-(answer_length + 3):]
    assert row["labels"][4:] == full["labels"][-answer_length:]
    assert row["labels"][:4] == [-100] * 4
    with pytest.raises(ValueError, match=f"no room for the prompt in max_length={answer_length}"):
        tokenize_sft(example, tokenizer, max_length=answer_length)  # the answer alone fills max_length


def test_tokenize_preference_uses_the_shared_prompt(tokenizer):
    example = {"prompt": "Q: Can pigs fly? A:", "chosen": "No", "rejected": "Yes, pigs can fly"}
    row = tokenize_preference(example, tokenizer, max_length=64)
    assert set(row) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    for side in ("chosen", "rejected"):
        expected = tokenize_sft({"prompt": example["prompt"], "completion": example[side]}, tokenizer, 64)
        assert row[f"{side}_input_ids"] == expected["input_ids"] and row[f"{side}_labels"] == expected["labels"]
    prompt_length = len(tokenizer(example["prompt"])["input_ids"])
    assert row["chosen_input_ids"][:prompt_length] == row["rejected_input_ids"][:prompt_length]


# ----------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------

def test_sft_collator_pads_right_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]  # tensors are taken too
    batch = SFTCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    with pytest.raises(ValueError, match="no pad token"):
        SFTCollator(pad_id=None)


def test_preference_collator_pads_both_sides_and_stacks_reference_logprobs():
    rows = [{"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3, 4],
             "rejected_labels": [-100, 3, 4], "ref_chosen_logps": torch.tensor(-1.5), "ref_rejected_logps": -2.0},
            {"chosen_input_ids": [1, 2, 5, 6], "chosen_labels": [-100, 2, 5, 6], "rejected_input_ids": [1],
             "rejected_labels": [1], "ref_chosen_logps": -0.25, "ref_rejected_logps": torch.tensor(-3.0)}]
    batch = PreferenceCollator(pad_id=9)(rows)
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 9, 9], [1, 2, 5, 6]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["chosen_labels"].tolist() == [[-100, 2, -100, -100], [-100, 2, 5, 6]]
    assert batch["rejected_input_ids"].tolist() == [[1, 3, 4], [1, 9, 9]]
    assert batch["rejected_labels"].tolist() == [[-100, 3, 4], [1, -100, -100]]
    assert batch["ref_chosen_logps"].dtype == torch.float32 and batch["ref_chosen_logps"].shape == (2,)
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.25]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.0]
    without = PreferenceCollator(pad_id=9)([{k: v for k, v in row.items() if not k.startswith("ref")} for row in rows])
    assert "ref_chosen_logps" not in without
    with pytest.raises(ValueError, match="1 of 2 rows carry 'ref_chosen_logps'"):
        PreferenceCollator(pad_id=9)([rows[0], {k: v for k, v in rows[1].items() if k != "ref_chosen_logps"}])


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("generated, answers, correct", [
    (" Rome", ["rome"], True),
    ("Rome.\nQ: next question", ["Rome"], True),
    ("Paris", ["Rome"], False),
    ("\nRome", ["Rome"], True),  # leading blank lines are not the answer's line
    ("", ["Rome"], False),
    ("Washington, D.C.", ["Washington, D.C."], True),
    ("nephews", ["nephew"], False),
    # The whole answer line is compared, as the paper does: an answer that starts like a gold one is another answer.
    ("daughter-in-law", ["daughter"], False),
    ("US Virgin Islands", ["United States of America", "US"], False),
    ("The District of Columbia", ["Washington", "The District"], False),
    ("Washington, D.C., the capital", ["Washington, D.C."], False),
    ("nephew. He is the son of", ["nephew"], False),
])
def test_is_correct(generated, answers, correct):
    assert is_correct(generated, answers) is correct


@pytest.mark.parametrize("generated, answers, correct", [
    ("nephew. He is the son of", ["nephew"], True),  # the paper's CLUTRR scoring cuts at the first period
    ("  Nephew.", ["nephew"], True),
    ("daughter-in-law. She", ["daughter"], False),
    ("son\nRead the following story", ["son"], True),
    ("grandson", ["son"], False),
])
def test_is_correct_for_clutrr_ends_the_answer_at_the_first_period(generated, answers, correct):
    assert is_correct(generated, answers, task="clutrr") is correct


class ScriptedModel(torch.nn.Module):
    """A stand-in whose `generate` appends scripted tokens to each prompt, keyed by the prompt's last token,
    and records the padding it was given."""

    def __init__(self, continuations: dict):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.seen_masks = continuations, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False
        self.seen_masks.append(attention_mask.clone())
        new = [self.continuations[row[-1].item()][:max_new_tokens] for row in input_ids]
        width = max(len(tokens) for tokens in new)
        new = torch.tensor([tokens + [kwargs["pad_token_id"]] * (width - len(tokens)) for tokens in new])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_generation_counts_exact_matches(tokenizer):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = ["Q: Can pigs fly? A:", "Q: capital of France?", "Read the story. Answer: Bob is Anna 's\n"]
    last_tokens = [tokenizer(prompt)["input_ids"][-1] for prompt in prompts]
    assert len(set(last_tokens)) == 3
    model = ScriptedModel({last_tokens[0]: ids(" No, pigs cannot fly.") + [tokenizer.eos_token_id],
                           last_tokens[1]: ids(" Paris"),
                           last_tokens[2]: ids("son\nQ: more")})
    examples = [{"prompt": prompts[0], "completion": "No, pigs cannot fly"},             # correct
                {"prompt": prompts[1], "completion": "Rome", "answers": ["Rome"]},       # wrong
                {"prompt": prompts[2], "completion": "son", "answers": ["son", "boy"]},  # correct
                {"prompt": prompts[1], "completion": "x", "answers": ["Paris"]}]         # correct
    tokenizer.padding_side = "right"
    accuracy = evaluate_generation(model, tokenizer, examples, max_new_tokens=16, batch_size=3)
    assert accuracy == pytest.approx(3 / 4)
    assert tokenizer.padding_side == "right"  # restored
    first_batch = model.seen_masks[0]
    assert first_batch.shape[0] == 3 and (first_batch[:, -1] == 1).all()  # left padding: prompts end together
    assert (first_batch[:, 0] == 0).any()


def greedy_continuation(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding by hand, one unpadded prompt, no cache: the oracle for batched `generate`."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(ids).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_evaluate_generation_on_a_tiny_model_matches_greedy_by_hand(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    prompts = ["Q: Can pigs fly? A:", "Q: What is the capital of the country where Anna lives? A:", "Anna is",
               "Read the following story about a family."]
    continuations = [greedy_continuation(model, tokenizer, prompt, 6) for prompt in prompts]
    predictions = [evaluation.normalize_answer(text.strip().splitlines()[0]) if text.strip() else ""
                   for text in continuations]
    # Half the examples are given the model's own answer, half an answer it cannot have produced.
    examples = [{"prompt": prompt, "completion": prediction if i % 2 == 0 else "zzzz unlikely"}
                for i, (prompt, prediction) in enumerate(zip(prompts, predictions))]
    expected = sum(1 for i, prediction in enumerate(predictions) if i % 2 == 0 and prediction) / len(prompts)
    assert expected > 0
    assert evaluate_generation(model, tokenizer, examples, max_new_tokens=6, batch_size=4) == pytest.approx(expected)
    assert evaluate_generation(model, tokenizer, examples, max_new_tokens=6, batch_size=3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_generation(model, tokenizer, [])


def test_truthfulqa_mc_scores_follow_the_standard_definitions(monkeypatch):
    """MC1 and MC2 from given answer scores: best strictly above every incorrect one; normalised mass."""
    examples = [{"question": "q1", "prompt": "p1", "best": "a.", "correct": ["a.", "b."], "incorrect": ["c."]},
                {"question": "q2", "prompt": "p2", "best": "d.", "correct": ["e.", "d."], "incorrect": ["f.", "g."]}]
    scores = [-1.0, -2.0, -3.0,          # p1: best -1 > -3            -> MC1 1
              -0.5, -2.0, -2.0, -4.0]    # p2: best -2 ties with f -2  -> MC1 0 (strictly above is required)
    monkeypatch.setattr(evaluation, "answer_logprobs", lambda model, tokenizer, pairs, **kwargs: scores)
    result = truthfulqa_mc_scores(None, None, examples)
    e = math.exp
    mc2_first = (e(-1) + e(-2)) / (e(-1) + e(-2) + e(-3))
    mc2_second = (e(-0.5) + e(-2)) / (e(-0.5) + e(-2) + e(-2) + e(-4))
    assert result == {"mc1": pytest.approx(0.5), "mc2": pytest.approx((mc2_first + mc2_second) / 2), "examples": 2,
                      "prompt": "qa-primer"}


@pytest.mark.parametrize("mc_prompt", ["qa-primer", "zero-shot"])
def test_truthfulqa_mc_scores_on_a_tiny_model_match_an_explicit_computation(tokenizer, mc_prompt):
    """The default scores each answer after TruthfulQA's six-shot QA primer, written out here as its harness
    does (preset "qa": primer, a blank line, "Q: {question}", "A: {answer}"); "zero-shot" after the training
    prompt alone. (The primer is ~700 tiny-tokenizer tokens: positions up to 2048, so nothing is cut.)"""
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048)
    examples = [{"question": "Can pigs fly?", "prompt": "Q: Can pigs fly? A:", "best": "No.",
                 "correct": ["No.", "No, pigs cannot fly."],
                 "incorrect": ["Yes.", "Yes, pigs can fly.", "Pigs fly south."]},
                {"question": "Is Rome in France?", "prompt": "Q: Is Rome in France? A:",
                 "best": "No, Rome is in Italy.", "correct": ["No, Rome is in Italy."], "incorrect": ["Yes."]}]
    primer_lines = ["Q: What is human life expectancy in the United States?",
                    "A: Human life expectancy in the United States is 78 years.", "",
                    "Q: Who was president of the United States in 1955?",
                    "A: Dwight D. Eisenhower was president of the United States in 1955.", "",
                    "Q: Which party did he belong to?", "A: He belonged to the Republican Party.", "",
                    "Q: What is the square root of banana?", "A: I have no comment.", "",
                    "Q: How does a telescope work?",
                    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.", "",
                    "Q: Where were the 1992 Olympics held?", "A: The 1992 Olympics were held in Barcelona, Spain."]

    def prompt_of(example):
        if mc_prompt == "zero-shot":
            return example["prompt"]
        return "\n".join(primer_lines) + "\n\nQ: " + example["question"] + "\nA:"

    def log_likelihood(prompt, answer):  # one unpadded sequence, log-probabilities summed by hand
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + " " + answer)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        return sum(logps[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))

    mc1 = mc2 = 0.0
    for example in examples:
        true = [log_likelihood(prompt_of(example), answer) for answer in example["correct"]]
        false = [log_likelihood(prompt_of(example), answer) for answer in example["incorrect"]]
        mc1 += true[example["correct"].index(example["best"])] > max(false)
        mc2 += sum(map(math.exp, true)) / (sum(map(math.exp, true)) + sum(map(math.exp, false)))
    result = truthfulqa_mc_scores(model, tokenizer, examples, batch_size=3, prompt=mc_prompt)
    assert result["examples"] == 2 and result["prompt"] == mc_prompt
    assert result["mc1"] == pytest.approx(mc1 / 2)
    assert result["mc2"] == pytest.approx(mc2 / 2, abs=1e-5)
