"""Data where users keep it (a `datasets` directory, parquet / CSV / JSON, a Hub name, renamed fields) and chat
templates (training rows, generation and multiple-choice scoring in the tokenizer's template)."""

import json

import pytest
import torch

from lofit_fast.cli import main
from lofit_fast.data import (
    chat_completion,
    chat_prompt,
    load_task,
    load_truthfulqa_mc,
    tokenize_preference,
    tokenize_sft,
)
from lofit_fast.evaluation import answer_logprobs, extract_answer, generate_answers, is_correct

from helpers import save_tiny_model_and_tokenizer, tiny_model, tiny_tokenizer
from test_data import TRUTHFULQA_HEADER, truthfulqa_row, write_csv, write_json_lines, write_json_list

datasets = pytest.importorskip("datasets")

ROWS = [{"question": "2+2=", "answer": "4", "id": 0}, {"question": "Capital of France?", "answer": "Paris", "id": 1},
        {"question": "Opposite of up?", "answer": "down", "id": 2}]
FIELDS = {"prompt": "question", "completion": "answer"}
EXPECTED = [{"prompt": row["question"], "completion": row["answer"], "answers": [row["answer"]]} for row in ROWS]


def write_sources(root):
    """The same rows in every kind of source `load_task` reads; (name, source, split) each."""
    dataset = datasets.Dataset.from_list(ROWS)
    write_json_lines(root / "rows.jsonl", ROWS)
    write_json_list(root / "rows.json", ROWS)
    dataset.to_csv(str(root / "rows.csv"), index=False)
    dataset.to_parquet(str(root / "rows.parquet"))
    dataset.save_to_disk(str(root / "saved_dataset"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(root / "saved_dict"))
    return [("jsonl", root / "rows.jsonl", None), ("json", root / "rows.json", None), ("csv", root / "rows.csv", None),
            ("parquet", root / "rows.parquet", None), ("save_to_disk", root / "saved_dataset", None),
            ("DatasetDict", root / "saved_dict", "train"), ("Dataset object", dataset, None)]


def test_every_source_gives_the_same_examples(tmp_path):
    for name, source, split in write_sources(tmp_path):
        assert load_task("sft", source, fields=FIELDS, split=split) == EXPECTED, name
    assert load_task("sft", tmp_path / "saved_dict", fields=FIELDS, split="test") == EXPECTED[:1]


def test_split_and_directory_mistakes_are_explained(tmp_path):
    write_sources(tmp_path)
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'test'\] and no split was given"):
        load_task("sft", tmp_path / "saved_dict", fields=FIELDS)
    with pytest.raises(ValueError, match="there is no split 'validation'"):
        load_task("sft", tmp_path / "saved_dict", fields=FIELDS, split="validation")
    with pytest.raises(ValueError, match="holds a single dataset, not a DatasetDict"):
        load_task("sft", tmp_path / "saved_dataset", fields=FIELDS, split="train")
    with pytest.raises(ValueError, match="applies to a datasets directory or a Hub dataset"):
        load_task("sft", tmp_path / "rows.jsonl", fields=FIELDS, split="train")
    folds = tmp_path / "fold_0.hf"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folds / "train"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folds / "val"))
    with pytest.raises(ValueError, match=r"subdirectories \['train', 'val'\] were written by save_to_disk: give one"):
        load_task("sft", folds, fields=FIELDS)
    with pytest.raises(ValueError, match="is a directory; give the data file itself"):
        load_task("sft", tmp_path, fields=FIELDS)


def test_fields_rename_columns_and_are_checked(tmp_path):
    source = datasets.Dataset.from_list(ROWS)
    with pytest.raises(ValueError, match=r"row 0 \(counted from 0\): missing field 'question' \(the prompt field\)"):
        load_task("sft", source.remove_columns("question"), fields=FIELDS)
    with pytest.raises(ValueError, match=r"task 'sft' has no field\(s\) \['question'\] to rename"):
        load_task("sft", source, fields={"question": "prompt"})
    preference = datasets.Dataset.from_list([{"q": "p", "good": "yes", "bad": "no"}])
    assert load_task("dpo-jsonl", preference, fields={"prompt": "q", "chosen": "good", "rejected": "bad"}) == \
        [{"prompt": "p", "chosen": "yes", "rejected": "no"}]


def test_a_hub_name_is_loaded_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_task("sft", "someone/qa-pairs", fields=FIELDS, split="validation") == EXPECTED
    assert load_task("sft", "qa_pairs", fields=FIELDS) == EXPECTED
    # A dataset with several configs (the Hub's TruthfulQA: generation, multiple_choice) is NAME:CONFIG.
    assert load_task("sft", "truthfulqa/truthful_qa:generation", fields=FIELDS, split="validation") == EXPECTED
    assert calls == [("someone/qa-pairs", None, "validation"), ("qa_pairs", None, "train"),
                     ("truthfulqa/truthful_qa", "generation", "validation")]


def test_an_unreachable_hub_name_says_what_was_tried(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match=r"no file or directory 'someone/qa'.*Hub dataset \(config None, split "
                                         r"'train'\) failed: ConnectionError: offline. .*NAME:CONFIG"):
        load_task("sft", "someone/qa")
    with pytest.raises(FileNotFoundError, match="no data file at"):  # a file name is never sent to the Hub
        load_task("sft", "missing.jsonl")


def test_truthfulqa_from_a_saved_dataset_with_csv_or_hub_column_names(tmp_path):
    """The paper's TruthfulQA folds are also stored with save_to_disk; the Hub's TruthfulQA names its columns
    differently and holds answers as lists. Both give what the CSV gives."""
    csv_path = write_csv(tmp_path / "folds.csv", [truthfulqa_row()])
    expected = load_truthfulqa_mc(csv_path)
    csv_columns = dict(zip(TRUTHFULQA_HEADER, truthfulqa_row()))
    datasets.Dataset.from_list([csv_columns]).save_to_disk(str(tmp_path / "fold_0_seed_42.hf"))
    hub_columns = {"question": csv_columns["Question"], "best_answer": csv_columns["Best Answer"],
                   "correct_answers": csv_columns["Correct Answers"].split("; "),
                   "incorrect_answers": csv_columns["Incorrect Answers"].split("; ")}
    datasets.Dataset.from_list([hub_columns]).to_parquet(str(tmp_path / "hub.parquet"))
    assert load_truthfulqa_mc(tmp_path / "fold_0_seed_42.hf") == expected
    assert load_truthfulqa_mc(tmp_path / "hub.parquet") == expected
    assert load_task("truthfulqa", tmp_path / "hub.parquet") == load_task("truthfulqa", csv_path)


# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}<s>[INST] {{ message['content'] }}"
                 " [/INST]{% else %} {{ message['content'] }}</s>{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_training_rows_follow_the_template_with_the_loss_on_the_answer(chat_tokenizer):
    example = {"prompt": "Q: Can pigs fly? A:", "completion": "No"}
    row = tokenize_sft(example, chat_tokenizer, max_length=512, chat_template=True)
    conversation = chat_tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]},
                                                       {"role": "assistant", "content": "No"}], tokenize=False)
    assert conversation == "<s>[INST] Q: Can pigs fly? A: [/INST] No</s>"
    assert row["input_ids"] == chat_tokenizer(conversation, add_special_tokens=False)["input_ids"]
    assert row["input_ids"].count(chat_tokenizer.bos_token_id) == 1  # the template's own, not a second one
    prompt_ids = chat_tokenizer(chat_prompt(example["prompt"], chat_tokenizer), add_special_tokens=False)["input_ids"]
    assert row["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)
    answer = [token for token in row["labels"] if token != -100]
    assert chat_tokenizer.decode(answer) == " No</s>" == chat_completion(example["prompt"], "No", chat_tokenizer)
    preference = tokenize_preference({"prompt": example["prompt"], "chosen": "No", "rejected": "Yes"}, chat_tokenizer,
                                     max_length=512, chat_template=True)
    assert preference["chosen_input_ids"] == row["input_ids"]


def test_generation_and_scoring_use_the_template(chat_tokenizer):
    model = tiny_model(vocab_size=len(chat_tokenizer))
    prompts = ["Q: Can pigs fly? A:", "Q: Is Rome in France? A:"]
    templated = [chat_prompt(prompt, chat_tokenizer) for prompt in prompts]
    expected = []
    for text in templated:  # one unpadded prompt at a time
        ids = torch.tensor([chat_tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                                 pad_token_id=0)
        expected.append(chat_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert generate_answers(model, chat_tokenizer, prompts, max_new_tokens=4, chat_template=True) == expected

    ids = chat_tokenizer(templated[0] + "No", add_special_tokens=False)["input_ids"]
    start = len(chat_tokenizer(templated[0], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    by_hand = sum(logps[t - 1, ids[t]].item() for t in range(start, len(ids)))
    assert answer_logprobs(model, chat_tokenizer, [(prompts[0], "No")], chat_template=True)[0] == \
        pytest.approx(by_hand, abs=1e-4)


def test_a_reasoning_models_template_keeps_its_think_block_out_of_the_answer():
    """Qwen3's template (the copy trl ships) writes an empty think block before the last assistant answer: with
    thinking on it would land in the trained completion, and a generated think block in the scored answer."""
    import importlib.resources

    template = importlib.resources.files("trl") / "chat_templates" / "qwen3.jinja"
    if not template.is_file():
        pytest.skip("this trl release ships no chat_templates/qwen3.jinja")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template.read_text()
    prompt = chat_prompt("Q: Can pigs fly? A:", tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat_completion("Q: Can pigs fly? A:", "No", tokenizer) == "No<|im_end|>\n"
    assert extract_answer("<think>\npigs are mammals\n</think>\n\nNo\nmore") == "no"
    assert is_correct("<think></think>No", ["No"]) and not is_correct("<think>No</think>Yes", ["No"])


def test_a_tokenizer_without_a_template_is_refused():
    with pytest.raises(ValueError, match="has no chat template .*--chat-template"):
        tokenize_sft({"prompt": "p", "completion": "c"}, tiny_tokenizer(), max_length=64, chat_template=True)


def test_the_command_line_reads_renamed_fields_from_parquet_with_a_chat_template(tmp_path, capsys):
    model_dir = tmp_path / "model"
    _, tokenizer = save_tiny_model_and_tokenizer(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    datasets.Dataset.from_list(ROWS * 2).to_parquet(str(tmp_path / "rows.parquet"))
    data = ["--task", "sft", "--data", str(tmp_path / "rows.parquet"), "--prompt-field", "question",
            "--completion-field", "answer", "--chat-template"]
    assert main(["tune", "--model", str(model_dir), *data, "--heads", "0:1,2:3", "--output-dir",
                 str(tmp_path / "adapter"), "--epochs", "1", "--batch-size", "2", "--backend", "torch"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), *data, "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", "2", "--backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 6
