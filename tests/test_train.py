"""The two LoFiT steps through Trainer: step 1 finds planted heads, step 2 trains only offsets."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lofit_fast
from lofit_fast.training import (HeadRanking, StepSettings, random_ranking, resolve_k, select_heads, tune,
                                 with_reference_logprobs)

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
    assert sorted((l, h) for l, h, _ in first.ranking) == [(l, h) for l in range(3) for h in range(8)]
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
        base_margin = (base_chosen
                       - sequence_logprobs(model(input_ids=batch["rejected_input_ids"]).logits, batch["rejected_labels"]))
    assert margin.mean() > base_margin.mean() + 0.1
