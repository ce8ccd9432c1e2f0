"""The two LoFiT steps through Trainer: step 1 finds planted heads, step 2 trains only offsets."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig

import lofit_fast
from lofit_fast.training import (
    HeadRanking,
    StepSettings,
    paper_settings,
    random_ranking,
    resolve_k,
    select_heads,
    tune,
    with_reference_logprobs,
)

QUIET = {"disable_tqdm": True, "logging_steps": 1000}
PLANTED = [(1, 5), (2, 2)]


def stack_rows(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def small_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def planted_task(model, heads, rows=64, length=12, planted="scale"):
    """SFT rows whose labels are the predictions of `model` with LoFiT on `heads` only (a large scale,
    or random offsets): the heads that matter, and that an adapter there can fit the task, are known."""
    teacher = lofit_fast.patch_model(model, heads=heads, scale=planted == "scale", offset=planted == "offset",
                                     backend="torch")
    with torch.no_grad():
        if planted == "scale":
            teacher.scale.fill_(3.0)
        else:
            teacher.offset.copy_(3.0 * torch.randn(teacher.offset.shape, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(1, 50, (rows, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predictions = model(ids).logits.argmax(-1)
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = predictions[:, :-1]  # HF shifts labels left by one inside the loss
        teacher_loss = model(input_ids=ids, labels=labels).loss.item()
    teacher.remove()
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}
            for i in range(rows)], teacher_loss


def test_select_heads_finds_the_planted_heads(tmp_path):
    model = small_llama()
    rows, _ = planted_task(model, PLANTED)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ranking = select_heads(model, rows, stack_rows, loss="sft", output_dir=str(tmp_path),
                           settings=StepSettings(learning_rate=2e-2, l1_lambda=1e-3, num_train_epochs=20,
                                                 per_device_train_batch_size=16),
                           training_args=QUIET, backend="torch")
    assert {(layer, head) for layer, head, _ in ranking.ranking[:2]} == set(PLANTED)
    assert len(ranking.ranking) == 3 * 8
    scores = [score for _, _, score in ranking.ranking]
    assert scores == sorted(scores, reverse=True)
    # The model is left as it was: no LoFiT, same weights, same flags.
    assert not hasattr(model, "lofit")
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) and parameter.requires_grad
    saved = HeadRanking.load(tmp_path / "ranking.json")
    assert saved.ranking == ranking.ranking and saved.localizer == "lofit"


def test_step_one_l1_penalty_is_part_of_the_loss(tmp_path):
    """A huge L1 drives every scale toward zero; without it the planted heads' scales grow."""
    norms = {}
    for l1 in (0.0, 1.0):
        model = small_llama()
        rows, _ = planted_task(model, PLANTED, rows=16)
        ranking = select_heads(model, rows, stack_rows, output_dir=str(tmp_path / str(l1)),
                               settings=StepSettings(learning_rate=2e-2, l1_lambda=l1, num_train_epochs=5,
                                                     per_device_train_batch_size=16),
                               training_args=QUIET, backend="torch")
        norms[l1] = sum(score for _, _, score in ranking.ranking)
    assert norms[1.0] < 0.5 * norms[0.0]


def test_tune_trains_offsets_only_on_top_k(tmp_path):
    model = small_llama()
    rows, teacher_loss = planted_task(model, PLANTED, rows=32, planted="offset")
    ranking = HeadRanking([(*head, 1.0) for head in PLANTED] + [(0, h, 0.1) for h in range(8)], 3, 8)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = model(**stack_rows(rows)).loss.item()
    handle = tune(model, rows, stack_rows, ranking=ranking, k=2, output_dir=str(tmp_path),
                  settings=StepSettings(learning_rate=5e-2, num_train_epochs=10, per_device_train_batch_size=16),
                  training_args=QUIET, backend="torch")
    assert handle.heads == PLANTED and handle.scale is None and handle.offset.shape == (2, 8)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["lofit.offset"]
    for name, parameter in model.named_parameters():
        if not name.startswith("lofit."):
            assert torch.equal(parameter, base[name]), name
    with torch.no_grad():
        loss_after = model(**stack_rows(rows)).loss.item()
    # The labels are the teacher's argmax: offsets on its heads fit them at least as well as the teacher.
    assert loss_after < min(teacher_loss, loss_before - 0.2)
    assert handle.method_settings["step"] == "tune" and handle.method_settings["learning_rate"] == 5e-2


def test_tune_needs_heads_or_ranking(tmp_path):
    model = small_llama()
    with pytest.raises(ValueError, match="either heads"):
        tune(model, [], stack_rows, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ranking is for 4 layers"):
        tune(model, [], stack_rows, ranking=HeadRanking([(0, 0, 1.0)], 4, 8), k=1, output_dir=str(tmp_path))


def test_random_localizer_is_seeded_and_covers_every_head(tmp_path):
    model = small_llama()
    first, again, other = random_ranking(model, 3), random_ranking(model, 3), random_ranking(model, 4)
    assert first.ranking == again.ranking and first.ranking != other.ranking
    assert sorted((layer, head) for layer, head, _ in first.ranking) == [(layer, head) for layer in range(3)
                                                                        for head in range(8)]
    ranking = select_heads(model, None, None, localizer="random", output_dir=str(tmp_path),
                           settings=StepSettings(seed=3))
    assert ranking.ranking == first.ranking
    assert json.loads((tmp_path / "ranking.json").read_text())["localizer"] == "random"


@pytest.mark.parametrize("k, total, expected", [(2, 24, 2), (0.1, 24, 2), (0.01, 24, 1), (24, 24, 24)])
def test_resolve_k(k, total, expected):
    assert resolve_k(k, total) == expected


@pytest.mark.parametrize("k", [0, 25, 1.5, -1, "3", True])
def test_resolve_k_rejects(k):
    with pytest.raises((ValueError, TypeError), match="k"):
        resolve_k(k, 24)


def test_ranking_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lofit select"):
        HeadRanking.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_layers": 3, "ranking": [[0, 1')
    with pytest.raises(ValueError, match="not a valid head ranking"):
        HeadRanking.load(bad)
    bad.write_text('{"num_layers": 3, "num_heads": 8}')
    with pytest.raises(ValueError, match="ranking"):
        HeadRanking.load(bad)


def preference_rows(count=8, length=10):
    generator = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(count):
        row = {}
        for side in ("chosen", "rejected"):
            ids = torch.randint(1, 50, (length,), generator=generator)
            labels = ids.clone()
            labels[:4] = -100  # the prompt
            row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                        f"{side}_labels": labels})
        rows.append(row)
    return rows


def test_dpo_reference_is_the_base_model_and_training_moves_the_margin(tmp_path):
    from lofit_fast.losses import sequence_logprobs

    model = small_llama()
    rows = preference_rows()
    handle = lofit_fast.patch_model(model, heads=PLANTED, scale=False, offset=True, backend="torch")
    with torch.no_grad():
        handle.offset.normal_()
    with_reference = with_reference_logprobs(handle, rows, stack_rows, batch_size=3)
    batch = stack_rows(rows)
    with torch.no_grad():
        handle.remove()
        base_chosen = sequence_logprobs(model(input_ids=batch["chosen_input_ids"]).logits, batch["chosen_labels"])
    assert torch.allclose(torch.stack([r["ref_chosen_logps"] for r in with_reference]), base_chosen, atol=1e-4)

    handle = tune(model, rows, stack_rows, heads=PLANTED, loss="dpo", output_dir=str(tmp_path),
                  settings=StepSettings(learning_rate=5e-2, num_train_epochs=10, per_device_train_batch_size=4),
                  training_args=QUIET, backend="torch")
    with torch.no_grad():
        margin = (sequence_logprobs(model(input_ids=batch["chosen_input_ids"]).logits, batch["chosen_labels"])
                  - sequence_logprobs(model(input_ids=batch["rejected_input_ids"]).logits, batch["rejected_labels"]))
        handle.remove()
        base_rejected = sequence_logprobs(model(input_ids=batch["rejected_input_ids"]).logits, batch["rejected_labels"])
        base_margin = base_chosen - base_rejected
    assert margin.mean() > base_margin.mean() + 0.1


# ----------------------------------------------------------------------------------------------
# The paper's training setup: schedule, subset, settings per model, accumulation, precision
# ----------------------------------------------------------------------------------------------

def logged(trainer_state_path, key):
    return [entry[key] for entry in json.loads(trainer_state_path.read_text())["log_history"] if key in entry]


def test_learning_rate_decays_linearly_to_zero_without_warmup(tmp_path):
    """The paper's TrainingArguments keep transformers' default schedule: linear decay to 0, no warmup."""
    model = small_llama()
    rows, _ = planted_task(model, PLANTED, rows=16)
    tune(model, rows, stack_rows, heads=PLANTED, output_dir=str(tmp_path),
         settings=StepSettings(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=4),
         training_args={"disable_tqdm": True, "logging_steps": 1, "save_strategy": "steps", "save_steps": 4},
         backend="torch")
    rates = logged(tmp_path / "checkpoint-4" / "trainer_state.json", "learning_rate")
    # The rate each of the 4 optimizer steps used: lr * (1 - (step - 1) / 4), reaching 0 after the last.
    assert rates == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3], abs=1e-12)


def test_clutrr_trains_on_the_papers_seeded_subset_of_300():
    """The paper's CLUTRR scripts pass --train_size 300 to both steps; lofit_trainer.py seeds Python's random
    with --seed (42) and the loader draws random.sample(train, 300)."""
    from lofit_fast.data import training_subset

    settings = paper_settings("clutrr")
    assert settings["select"].train_size == 300 and settings["tune"].train_size == 300
    for task in ("mquake", "truthfulqa", None):
        assert paper_settings(task)["select"].train_size is None and paper_settings(task)["tune"].train_size is None
    examples = list(range(3151))
    assert training_subset(examples, 300, seed=42) == random.Random(42).sample(examples, 300)
    assert training_subset(examples, None, seed=42) is examples


@pytest.mark.parametrize("step", ["select", "tune"])
def test_train_size_trains_on_a_seeded_subset(tmp_path, step):
    model = small_llama()
    rows, _ = planted_task(model, PLANTED, rows=10)
    seen = []

    def collate(batch_rows):  # records which rows training reads
        seen.extend(row["number"] for row in batch_rows)
        return stack_rows([{key: value for key, value in row.items() if key != "number"} for row in batch_rows])

    numbered = [{**row, "number": i} for i, row in enumerate(rows)]
    settings = StepSettings(num_train_epochs=1, per_device_train_batch_size=4, train_size=4, seed=7)
    if step == "select":
        ranking = select_heads(model, numbered, collate, settings=settings, output_dir=str(tmp_path),
                               training_args=QUIET, backend="torch")
        assert ranking.settings["train_size"] == 4
    else:
        handle = tune(model, numbered, collate, heads=PLANTED, settings=settings, output_dir=str(tmp_path),
                      training_args=QUIET, backend="torch")
        assert handle.method_settings["train_size"] == 4
    assert sorted(seen) == sorted(random.Random(7).sample(range(10), 4))


# Configs of the paper's three models (only the shape matters; nothing is built).
LLAMA_2_7B = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)
LLAMA_2_13B = LlamaConfig(num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, hidden_size=5120)
GEMMA_7B = GemmaConfig(num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                       hidden_size=3072)


@pytest.mark.parametrize("config, task, expected", [
    # (paper model, step-1 lr, l1_lambda, K, step-2 lr) from the paper's train_script_*.sh
    (LLAMA_2_7B, "truthfulqa", ("llama-2-7b", 5e-3, 5e-4, 32, 1e-2)),
    (LLAMA_2_7B, "clutrr", ("llama-2-7b", 5e-4, 5e-3, 32, 1e-2)),
    (LLAMA_2_13B, "truthfulqa", ("llama-2-13b", 1e-3, 1e-3, 48, 2e-2)),
    (LLAMA_2_13B, "mquake", ("llama-2-13b", 1e-3, 1e-3, 48, 8e-3)),
    (LLAMA_2_13B, "clutrr", ("llama-2-13b", 1e-3, 1e-3, 48, 1e-2)),
    (GEMMA_7B, "truthfulqa", ("gemma-7b", 5e-3, 5e-4, 16, 2e-2)),
    (GEMMA_7B, "mquake", ("gemma-7b", 5e-3, 5e-4, 16, 8e-3)),
    (GEMMA_7B, "clutrr", ("gemma-7b", 5e-4, 5e-3, 16, 1e-2)),
], ids=lambda value: value if isinstance(value, str) else None)
def test_paper_settings_are_picked_by_the_models_shape(config, task, expected):
    settings = paper_settings(task, model=config)
    paper_model, select_lr, l1_lambda, k, tune_lr = expected
    assert settings["paper_model"] == paper_model and paper_model in settings["source"]
    assert (settings["select"].learning_rate, settings["select"].l1_lambda) == (select_lr, l1_lambda)
    assert settings["k"] == k and settings["tune"].learning_rate == tune_lr and settings["tune"].l1_lambda == 0
    assert settings["select"].source == settings["tune"].source == settings["source"]


def test_paper_settings_fall_back_to_llama_2_7b_and_can_be_chosen():
    tiny = paper_settings("clutrr", model=small_llama())
    assert tiny["paper_model"] == "llama-2-7b" and "no paper settings for this model" in tiny["source"]
    chosen = paper_settings("clutrr", model=small_llama(), paper_model="gemma-7b")
    assert chosen["paper_model"] == "gemma-7b" and chosen["k"] == 16 and "chosen" in chosen["source"]
    generic = paper_settings("sft-jsonl", model=LLAMA_2_13B)
    assert generic["k"] == 48 and generic["select"].learning_rate == 1e-3 and "mquake" in generic["source"]
    with pytest.raises(ValueError, match="llama-2-13b"):
        paper_settings("clutrr", paper_model="llama-3")


def test_select_and_tune_default_to_the_settings_of_the_models_shape(tmp_path, monkeypatch):
    """Without settings, both steps take the paper's settings for the model's shape, not always Llama 2-7B's."""
    from lofit_fast import training

    monkeypatch.setitem(training.PAPER_MODEL_SHAPES, "gemma-7b", ("llama", 3, 8, 4, 8))  # small_llama's shape
    model = small_llama()
    rows, _ = planted_task(model, PLANTED, rows=4, planted="offset")
    args = {**QUIET, "max_steps": 1}
    ranking = select_heads(model, rows, stack_rows, output_dir=str(tmp_path / "select"), training_args=args,
                           backend="torch")
    assert ranking.settings["learning_rate"] == 5e-3 and ranking.settings["l1_lambda"] == 5e-4
    assert "gemma-7b" in ranking.settings["source"]
    handle = tune(model, rows, stack_rows, ranking=ranking, k=None, output_dir=str(tmp_path / "tune"),
                  training_args=args, backend="torch")
    assert len(handle.heads) == 16  # Gemma-7B's K (Llama 2-7B's, 32, is more than the model's 24 heads)
    assert handle.method_settings["learning_rate"] == 8e-3 and "gemma-7b" in handle.method_settings["source"]


def accumulation_run(tmp_path, batch_size, accumulation, rows):
    """First optimizer step of LofitTrainer on `rows`: (the gradients it applies, the loss it logs)."""
    from transformers import TrainerCallback, TrainingArguments

    from lofit_fast.training import LofitTrainer

    model = small_llama()
    handle = lofit_fast.patch_model(model, heads=PLANTED + [(0, 3)], backend="torch")
    with torch.no_grad():
        handle.scale.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        handle.offset.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    gradients = []

    class RecordGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            gradients.append([p.grad.clone() for p in handle.lofit.parameters()])

    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
                                  gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1,
                                  report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                  remove_unused_columns=False, seed=0)
    trainer = LofitTrainer(model=model, args=arguments, train_dataset=rows, data_collator=stack_rows, handle=handle,
                           loss="sft", l1_lambda=1e-2, callbacks=[RecordGradients()])
    trainer.train()
    return gradients[0], trainer.state.log_history[0]["loss"]


def test_gradient_accumulation_gives_the_gradient_and_loss_of_the_whole_batch(tmp_path):
    """Transformers 5 passes num_items_in_batch and then leaves the loss undivided: batch 4 x 1 and 2 x 2 must
    apply the same gradient and log the same loss (rows with different answer lengths, and the L1 term)."""
    model = small_llama()
    rows, _ = planted_task(model, PLANTED, rows=4)
    for i, row in enumerate(rows):
        row["labels"] = row["labels"].clone()
        row["labels"][: 2 + 3 * i] = -100  # 10, 7, 4 and 1 answer tokens
    whole, whole_loss = accumulation_run(tmp_path / "whole", 4, 1, rows)
    accumulated, accumulated_loss = accumulation_run(tmp_path / "accumulated", 2, 2, rows)
    for a, b in zip(accumulated, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-5)


def test_dpo_reference_runs_under_the_same_autocast_as_the_policy(tmp_path):
    """With bf16 mixed precision, the policy runs under autocast; the reference must too, or the DPO margin of
    an untrained adapter (offsets 0: the policy is the base model) is not 0 and the first loss not log 2."""
    model = small_llama()
    rows = preference_rows(count=4)
    tune(model, rows, stack_rows, heads=PLANTED, loss="dpo", output_dir=str(tmp_path),
         settings=StepSettings(init_std=0.0, per_device_train_batch_size=4, num_train_epochs=1),
         training_args={"disable_tqdm": True, "logging_steps": 1, "bf16": True, "save_strategy": "steps",
                        "save_steps": 1, "max_steps": 1}, backend="torch")
    [loss] = logged(tmp_path / "checkpoint-1" / "trainer_state.json", "loss")
    assert loss == pytest.approx(math.log(2), abs=1e-6)


def test_float16_training_without_loss_scaling_is_refused(tmp_path):
    model = small_llama().half()
    rows, _ = planted_task(small_llama(), PLANTED, rows=4)
    with pytest.raises(ValueError, match="float16.*loss scaling"):
        tune(model, rows, stack_rows, heads=PLANTED, output_dir=str(tmp_path), training_args=QUIET, backend="torch")
    assert not hasattr(model, "lofit")


def test_tune_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    """`tune --save-steps`: each checkpoint is the adapter (not the base model) plus optimizer state."""
    settings = StepSettings(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=4)
    arguments = {"disable_tqdm": True, "logging_strategy": "no", "save_strategy": "steps", "save_steps": 2}
    model = small_llama()
    rows, _ = planted_task(model, PLANTED, rows=16)
    handle = tune(model, rows, stack_rows, heads=PLANTED, output_dir=str(tmp_path / "run"), settings=settings,
                  training_args=arguments, backend="torch")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files
    assert "model.safetensors" not in files
    assert lofit_fast.load_adapter(small_llama(), checkpoint).heads == PLANTED

    resumed = tune(small_llama(), rows, stack_rows, heads=PLANTED, output_dir=str(tmp_path / "resumed"),
                   settings=settings, training_args=arguments, backend="torch",
                   resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.offset, handle.offset)
