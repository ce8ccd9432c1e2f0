"""The `lofit` command end to end on a tiny saved Llama and a locally built tokenizer.

Each command runs in-process through `lofit_fast.cli.main([...])` with one epoch over a few rows, the
torch backend (the Triton interpreter would only slow this down; the kernels have their own tests), and
its results are checked against the library called directly.
"""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lofit_fast
from lofit_fast.cli import main
from lofit_fast.data import load_truthfulqa_mc
from lofit_fast.evaluation import generate_answers, is_correct, truthfulqa_mc_scores

from helpers import QUANTIZABLE_CONFIG, save_tiny_model_and_tokenizer
from test_data import clutrr_row, mquake_row, truthfulqa_row, write_csv, write_json_lines, write_json_list

TRAIN = ["--epochs", "1", "--batch-size", "4", "--backend", "torch"]
# Heads of the hand-made adapter with large offsets, so that it visibly changes the model's output.
ADAPTER_HEADS = [(0, 1), (1, 4), (2, 3)]



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny Llama with its tokenizer, data files in each task's format, and an adapter with
    large offsets written by the library (not by the CLI)."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_and_tokenizer(root / "model")
    save_tiny_model_and_tokenizer(root / "quantizable_model", **QUANTIZABLE_CONFIG)
    people = [("Anna", "Bob", "son"), ("Cleo", "Roy", "nephew"), ("Mary", "Kelly", "daughter"), ("Guy", "Ann", "aunt")]
    write_json_list(root / "clutrr.json", [clutrr_row(*names) for names in people * 2])
    write_json_lines(root / "mquake.jsonl", [mquake_row()] * 4)
    write_csv(root / "truthfulqa.csv", [truthfulqa_row(), truthfulqa_row("Is Rome in France?", "No, it is in Italy",
                                                                         "No, it is in Italy; No", "Yes; Yes, it is")])
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    handle = lofit_fast.patch_model(model, heads=ADAPTER_HEADS, scale=False, offset=True, backend="torch")
    with torch.no_grad():
        handle.offset.copy_(torch.randn(handle.offset.shape, generator=torch.Generator().manual_seed(0)) * 3)
    handle.save_pretrained(root / "big_adapter")
    for name, layers in (("hand_ranking.json", 3), ("other_model_ranking.json", 4)):
        heads = [[layer, head, 1.0 / (1 + 6 * layer + head)] for layer in range(layers) for head in range(6)]
        (root / name).write_text(json.dumps({"num_layers": layers, "num_heads": 6, "ranking": heads}))
    return root


def run(argv, capsys):
    """(exit status, stdout, stderr) of `lofit argv`."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def base_model(workspace, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    if adapter is not None:
        lofit_fast.load_adapter(model, adapter, backend="torch")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# select -> tune -> eval -> merge
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selected(workspace):
    out = workspace / "select"
    status = main([str(arg) for arg in ["select", "--model", workspace / "model", "--task", "clutrr", "--data",
                                        workspace / "clutrr.json", "--output-dir", out, *TRAIN]])
    assert status == 0
    return out


def test_select_writes_a_full_ranking_and_a_heatmap(selected):
    ranking = json.loads((selected / "ranking.json").read_text())
    assert (ranking["num_layers"], ranking["num_heads"], ranking["localizer"]) == (3, 6, "lofit")
    heads = [(layer, head) for layer, head, _ in ranking["ranking"]]
    assert sorted(heads) == [(layer, head) for layer in range(3) for head in range(6)]
    scores = [score for _, _, score in ranking["ranking"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert (selected / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_from_the_ranking_trains_its_top_k(workspace, selected, capsys):
    out = workspace / "tuned"
    status, stdout, _ = run(["tune", "--model", workspace / "model", "--task", "clutrr", "--data",
                             workspace / "clutrr.json", "--ranking", selected / "ranking.json", "--k", "3",
                             "--output-dir", out, *TRAIN], capsys)
    assert status == 0 and f"adapter: {out} (3 heads)" in stdout
    top = [[layer, head] for layer, head, _ in json.loads((selected / "ranking.json").read_text())["ranking"][:3]]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["heads"] == top and config["offset"] and not config["scale"]
    assert config["method"]["loss"] == "sft" and config["method"]["learning_rate"] == 1e-2  # the paper's step 2


def test_tune_dpo_with_explicit_heads(workspace, capsys):
    out = workspace / "dpo"
    status, stdout, _ = run(["tune", "--model", workspace / "model", "--task", "truthfulqa", "--data",
                             workspace / "truthfulqa.csv", "--heads", "0:1,2:3", "--output-dir", out, *TRAIN], capsys)
    assert status == 0 and "(2 heads)" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["heads"] == [[0, 1], [2, 3]] and config["method"]["loss"] == "dpo"
    assert sorted(path.name for path in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_eval_applies_the_adapter(workspace, capsys):
    """An eval file whose answers are the adapted model's own greedy answers for rows 0 and 2 (and answers it
    cannot give for rows 1 and 3) scores 0.5 with --adapter; without it, whatever the base model matches."""
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    prompts = ["Q: Can pigs fly? A:", "Anna is", "Q: What is the capital of France? A:", "Bob is the son of"]
    adapted = generate_answers(base_model(workspace, workspace / "big_adapter"), tokenizer, prompts, max_new_tokens=4)
    base = generate_answers(base_model(workspace), tokenizer, prompts, max_new_tokens=4)
    assert adapted != base  # the adapter changes what the model says
    answers = [adapted[0].strip().splitlines()[0], "zzzz", adapted[2].strip().splitlines()[0], "zzzz"]
    assert answers[0].strip() and answers[2].strip()
    write_json_lines(workspace / "eval.jsonl", [{"prompt": prompt, "completion": answer}
                                                for prompt, answer in zip(prompts, answers)])
    common = ["eval", "--model", workspace / "model", "--task", "sft-jsonl", "--data", workspace / "eval.jsonl",
              "--max-new-tokens", "4", "--backend", "torch"]
    status, stdout, _ = run(common + ["--adapter", workspace / "big_adapter"], capsys)
    assert status == 0 and json.loads(stdout) == {"exact_match": 0.5, "examples": 4}
    status, stdout, _ = run(common, capsys)
    expected = sum(is_correct(text, [answer]) for text, answer in zip(base, answers)) / 4
    assert status == 0 and json.loads(stdout) == {"exact_match": expected, "examples": 4}


def test_eval_truthfulqa_reports_mc1_and_mc2(workspace, capsys):
    status, stdout, _ = run(["eval", "--model", workspace / "model", "--task", "truthfulqa", "--data",
                             workspace / "truthfulqa.csv", "--adapter", workspace / "big_adapter",
                             "--backend", "torch"], capsys)
    assert status == 0
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    expected = truthfulqa_mc_scores(base_model(workspace, workspace / "big_adapter"), tokenizer,
                                    load_truthfulqa_mc(workspace / "truthfulqa.csv"))
    result = json.loads(stdout)
    assert result["examples"] == 2 and result["mc1"] == expected["mc1"]
    assert result["mc2"] == pytest.approx(expected["mc2"], abs=1e-6)


def test_merged_model_reloads_with_the_adapters_logits(workspace, capsys):
    out = workspace / "merged"
    status, stdout, _ = run(["merge", "--model", workspace / "model", "--adapter", workspace / "big_adapter",
                             "--output-dir", out, "--backend", "torch"], capsys)
    assert status == 0 and f"merged model for transformers: {out}" in stdout
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.attention_bias and not hasattr(merged, "lofit")
    ids = AutoTokenizer.from_pretrained(out)(["Q: Can pigs fly? A: No"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base_model(workspace, workspace / "big_adapter")(ids).logits
        plain = base_model(workspace)(ids).logits
        reloaded = merged(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-2)  # the adapter matters
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=1e-4)


def test_tune_and_eval_on_a_4bit_base(workspace, capsys):
    """bitsandbytes NF4 runs on the CPU: the offsets train over the quantized base, and eval loads them back."""
    pytest.importorskip("bitsandbytes")
    out = workspace / "tuned_4bit"
    status, stdout, _ = run(["tune", "--model", workspace / "quantizable_model", "--task", "mquake", "--data",
                             workspace / "mquake.jsonl", "--heads", "0:1,2:3", "--output-dir", out, "--load-in-4bit",
                             "--lr", "5e-2", *TRAIN], capsys)
    assert status == 0 and "(2 heads)" in stdout
    from safetensors.torch import load_file

    offsets = next(iter(load_file(out / "adapter_model.safetensors").values()))
    # Initialised Normal(0, 1e-3); one epoch of Adam at lr 5e-2 moves each entry by about the learning rate.
    assert offsets.shape == (2, QUANTIZABLE_CONFIG["head_dim"]) and offsets.abs().max() > 1e-2
    status, stdout, _ = run(["eval", "--model", workspace / "quantizable_model", "--task", "mquake", "--data",
                             workspace / "mquake.jsonl", "--adapter", out, "--load-in-4bit", "--max-new-tokens", "2",
                             "--backend", "torch"], capsys)
    assert status == 0 and json.loads(stdout)["examples"] == 4


def test_tune_prints_and_records_the_paper_settings_it_used(workspace, capsys):
    out = workspace / "tuned_subset"
    status, stdout, stderr = run(["tune", "--model", workspace / "model", "--task", "clutrr", "--data",
                                  workspace / "clutrr.json", "--heads", "0:1", "--train-size", "3",
                                  "--output-dir", out, *TRAIN], capsys)
    assert status == 0
    # The tiny model has none of the paper's shapes: Llama-2-7B's settings, and the line says so.
    assert "settings: llama-2-7b clutrr" in stdout and "no paper settings for this model" in stdout
    method = json.loads((out / "adapter_config.json").read_text())["method"]
    assert method["train_size"] == 3 and method["source"].startswith("llama-2-7b clutrr")
    status, stdout, _ = run(["tune", "--model", workspace / "model", "--task", "clutrr", "--data",
                             workspace / "clutrr.json", "--heads", "0:1", "--paper-model", "gemma-7b",
                             "--output-dir", workspace / "tuned_gemma_settings", *TRAIN], capsys)
    assert status == 0 and "settings: gemma-7b clutrr" in stdout
    method = json.loads((workspace / "tuned_gemma_settings" / "adapter_config.json").read_text())["method"]
    assert method["train_size"] == 300  # the paper's CLUTRR subset (the file has 8 rows: all are used)


def test_training_loads_a_float16_checkpoint_in_float32(workspace, tmp_path, capsys, monkeypatch):
    """Pure fp16 training has no loss scaling: `lofit tune` loads an fp16 checkpoint in fp32 unless told."""
    from lofit_fast import training

    directory = tmp_path / "fp16_model"
    AutoModelForCausalLM.from_pretrained(workspace / "model").half().save_pretrained(directory)
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(directory)
    dtypes = []

    def record_dtype(model, *args, **kwargs):
        dtypes.append(model.dtype)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(training, "tune", record_dtype)
    notes = []
    for extra, dtype in (([], torch.float32), (["--dtype", "bfloat16"], torch.bfloat16)):
        status, _, stderr = run(["tune", "--model", directory, "--task", "clutrr", "--data", workspace / "clutrr.json",
                                 "--heads", "0:1", "--output-dir", tmp_path / "never", *TRAIN, *extra], capsys)
        assert status == 2 and "stop after loading" in stderr
        assert dtypes[-1] == dtype
        notes.append("loads it in float32" in stderr)
    assert notes == [True, False]


# ----------------------------------------------------------------------------------------------
# Errors: one line, exit status 2
# ----------------------------------------------------------------------------------------------

def _bad_data(workspace):
    path = workspace / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    return path


ERRORS = {
    "missing model": (lambda w: ["eval", "--model", w / "no_such_model", "--task", "clutrr", "--data",
                                 w / "clutrr.json"], ["no model directory at", "no_such_model"]),
    "adapter as model": (lambda w: ["eval", "--model", w / "big_adapter", "--task", "clutrr", "--data",
                                    w / "clutrr.json"], ["has no config.json"]),
    "missing data": (lambda w: ["eval", "--model", w / "model", "--task", "clutrr", "--data", w / "nothing.json"],
                     ["no data file at", "nothing.json"]),
    "bad data row": (lambda w: ["tune", "--model", w / "model", "--task", "sft-jsonl", "--data", _bad_data(w),
                                "--heads", "0:1", "--output-dir", w / "never", *TRAIN],
                     ["bad.jsonl, line 2", "missing field 'completion'"]),
    "bad heads": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data", w / "clutrr.json",
                             "--heads", "3-7", "--output-dir", w / "never", *TRAIN],
                  ["--heads '3-7'", "layer:head"]),
    "head out of range": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data", w / "clutrr.json",
                                     "--heads", "0:1,7:0", "--output-dir", w / "never", *TRAIN],
                          ["head (7, 0)", "out of range"]),
    "missing ranking": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data", w / "clutrr.json",
                                   "--ranking", w / "no_ranking.json", "--output-dir", w / "never", *TRAIN],
                        ["no head ranking at", "lofit select"]),
    "k out of range": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data", w / "clutrr.json",
                                  "--ranking", w / "hand_ranking.json", "--k", "50", "--output-dir", w / "never",
                                  *TRAIN], ["k=50", "between 1 and 18"]),
    "k with heads": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data", w / "clutrr.json",
                                "--heads", "0:1", "--k", "3", "--output-dir", w / "never", *TRAIN], ["--k", "--heads"]),
    "ranking of another model": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data",
                                            w / "clutrr.json", "--ranking", w / "other_model_ranking.json",
                                            "--output-dir", w / "never", *TRAIN],
                                 ["ranking is for 4 layers x 6 heads", "3 x 6"]),
    "no heads at all": (lambda w: ["tune", "--model", w / "model", "--task", "clutrr", "--data", w / "clutrr.json",
                                   "--output-dir", w / "never", *TRAIN], ["--ranking", "--heads"]),
    "eval of dpo data": (lambda w: ["eval", "--model", w / "model", "--task", "dpo-jsonl", "--data", w / "x.jsonl"],
                         ["task dpo has no generation answers"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_status_2(workspace, capsys, case):
    argv, words = ERRORS[case]
    status, stdout, stderr = run(argv(workspace), capsys)
    assert status == 2
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("lofit: error: "), stderr
    assert stderr.rstrip("\n").splitlines()[-1] == errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    assert not (workspace / "never").exists()  # failed before anything was written


def test_bitsandbytes_optional_kernel_notice_is_dropped(workspace, capsys, caplog):
    """On an AVX512-BF16 CPU, importing bitsandbytes (transformers' Trainer does) logs that an optional kernel
    from the `kernels` package could not be loaded, in the middle of a command's output; the command line
    drops that one notice and nothing else."""
    run(["eval", "--model", workspace / "no_such_model", "--task", "clutrr", "--data", workspace / "clutrr.json"],
        capsys)
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("a warning of bitsandbytes' own")
    assert [record.getMessage() for record in caplog.records] == ["a warning of bitsandbytes' own"]
