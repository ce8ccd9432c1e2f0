"""The probing localizer: a planted head is found from SFT and preference rows, the model is left as it
was, and the probes, the pairs and the errors behave as documented.

The task: a prompt ends in a key token k, the correct answer is the token k + ANSWER_SHIFT (then EOS).
Whether a sequence's answer is correct depends on two tokens together, which a linear probe on a random
tiny model's heads cannot read; `planted_signal` makes one head carry it, at the last token only.
"""

import contextlib
import json
import random

import pytest
import torch

from lofit_fast.cli import main
from lofit_fast.data import PreferenceCollator, SFTCollator
from lofit_fast.probing import MIN_PAIRS, fit_probes, probe_ranking, sft_contrast_pairs
from lofit_fast.training import HeadRanking, StepSettings, select_heads

from helpers import save_tiny_model_and_tokenizer, tiny_model
from test_data import clutrr_row, write_json_list

KEYS = range(10, 30)
ANSWER_SHIFT = 40  # answers are tokens 50..69; fillers 70..96, so no answer token appears in a prompt
PLANTED = (2, 4)  # the last layer: no later head can read the planted signal back from the residual stream
PAD, EOS = 0, 2


def prompts(count: int, seed: int = 0) -> list:
    """Prompts of 4 to 7 tokens (so batches are padded): BOS, fillers, then a key token."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(70, 97) for _ in range(rng.randrange(2, 6))] + [rng.choice(KEYS)]
            for _ in range(count)]


def sft_row(prompt: list, key: int) -> dict:
    answer = [key + ANSWER_SHIFT, EOS]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def sft_rows(count: int = 48, seed: int = 0) -> list:
    return [sft_row(prompt, prompt[-1]) for prompt in prompts(count, seed)]


def preference_rows(count: int = 48, seed: int = 0) -> list:
    rng = random.Random(seed + 1)
    rows = []
    for prompt in prompts(count, seed):
        wrong = rng.choice([key for key in KEYS if key != prompt[-1]])
        chosen, rejected = sft_row(prompt, prompt[-1]), sft_row(prompt, wrong)
        rows.append({"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                     "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]})
    return rows


BOTH_FORMATS = [(sft_rows(), SFTCollator(PAD)), (preference_rows(), PreferenceCollator(PAD))]
ALL_HEADS = [(layer, head) for layer in range(3) for head in range(6)]


@contextlib.contextmanager
def planted_signal(model, head=PLANTED, strength=3.0):
    """Inside the block, head `head`'s part of o_proj's input gets +strength * u at the last token of a
    sequence whose answer is correct and -strength * u where it is wrong (u a fixed unit vector). The
    answer is read from the model's input_ids (right padding, as the collators pad)."""
    layer, index = head
    head_dim = model.config.head_dim
    direction = torch.nn.functional.normalize(torch.randn(head_dim, generator=torch.Generator().manual_seed(5)), dim=0)
    seen = {}

    def remember_input(module, args, kwargs):
        seen["ids"], seen["mask"] = kwargs["input_ids"], kwargs["attention_mask"]

    def add_signal(module, args):
        ids, z = seen["ids"], args[0].clone()
        rows = torch.arange(len(ids))
        last = seen["mask"].sum(1) - 1
        correct = ids[rows, last - 1] == ids[rows, last - 2] + ANSWER_SHIFT
        sign = correct.float() * 2 - 1
        z[rows, last, index * head_dim:(index + 1) * head_dim] += strength * sign[:, None] * direction
        return (z, *args[1:])

    hooks = [model.register_forward_pre_hook(remember_input, with_kwargs=True),
             model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(add_signal)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("rows, collator", BOTH_FORMATS, ids=["sft", "preference"])
def test_the_planted_head_ranks_first(rows, collator):
    model = tiny_model()
    with planted_signal(model):
        ranking = probe_ranking(model, rows, collator, batch_size=16)
    assert ranking.localizer == "probe" and (ranking.num_layers, ranking.num_heads) == (3, 6)
    assert sorted((layer, head) for layer, head, _ in ranking.ranking) == ALL_HEADS
    scores = [score for _, _, score in ranking.ranking]
    assert scores == sorted(scores, reverse=True)
    assert ranking.ranking[0] == (*PLANTED, 1.0)
    # Every other head is near chance (validation: 10 pairs, 20 sequences).
    others = sorted(scores[1:])
    assert others[len(others) // 2] <= 0.7 and others[-1] <= 0.85, others
    assert ranking.settings["pairs"] == 48 and ranking.settings["validation_pairs"] == 10
    assert ranking.settings["format"] == ("dpo" if "chosen_input_ids" in rows[0] else "sft")


def test_without_the_signal_no_head_stands_out():
    ranking = probe_ranking(tiny_model(), sft_rows(), SFTCollator(PAD), batch_size=16)
    assert ranking.ranking[0][2] < 0.9


def hook_count(model) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def test_the_model_is_left_as_it_was():
    model = tiny_model()
    model.train()  # the probe runs in eval mode; the mode must come back
    model.model.embed_tokens.weight.requires_grad_(False)
    ids = torch.tensor([sft_rows(1)[0]["input_ids"]])
    before = {"parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
              "flags": {name: p.requires_grad for name, p in model.named_parameters()},
              "hooks": hook_count(model)}
    with torch.no_grad():
        logits = model(ids).logits
    probe_ranking(model, sft_rows(), SFTCollator(PAD), batch_size=16)
    assert model.training and all(module.training for module in model.modules())
    assert hook_count(model) == before["hooks"]
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before["parameters"][name]) and parameter.grad is None, name
        assert parameter.requires_grad == before["flags"][name], name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize("rows, collator", BOTH_FORMATS, ids=["sft", "preference"])
def test_the_seed_fixes_the_ranking(rows, collator):
    """The seed draws the SFT negatives and the train/validation split (the only randomness for preference rows)."""
    model = tiny_model()
    with planted_signal(model):
        first = probe_ranking(model, rows, collator, seed=3)
        again = probe_ranking(model, rows, collator, seed=3, batch_size=5)  # batching does not matter
        other = probe_ranking(model, rows, collator, seed=4)
    assert first.ranking == again.ranking
    assert first.ranking != other.ranking and other.ranking[0][:2] == PLANTED


def test_sft_negatives_share_the_prompt_and_take_another_answer():
    rows = sft_rows(30)
    # Padded rows (as a pre-collated dataset holds them) give the same pairs: padding is dropped first.
    padded = [{"input_ids": row["input_ids"] + [PAD] * 3, "labels": row["labels"] + [-100] * 3,
               "attention_mask": [1] * len(row["input_ids"]) + [0] * 3} for row in rows]
    pairs = sft_contrast_pairs(rows, random.Random(0))
    assert len(pairs) == 30
    for row, (positive, negative) in zip(rows, pairs):
        assert positive["input_ids"].tolist() == row["input_ids"] and positive["labels"].tolist() == row["labels"]
        prompt = len(row["input_ids"]) - 2
        assert negative["input_ids"][:prompt].tolist() == row["input_ids"][:prompt]
        assert negative["labels"][:prompt].tolist() == [-100] * prompt
        assert negative["input_ids"][prompt:].tolist() != row["input_ids"][prompt:]
        assert negative["input_ids"][prompt:].tolist() == negative["labels"][prompt:].tolist()
    padded_pairs = sft_contrast_pairs(padded, random.Random(0))
    assert all(torch.equal(a[side]["input_ids"], b[side]["input_ids"])
               for a, b in zip(pairs, padded_pairs) for side in (0, 1))


def test_sft_negatives_come_only_from_other_answers():
    rows = [sft_row(prompt, 10) for prompt in prompts(6)] + [sft_row(prompts(1)[0], 11)]
    pairs = sft_contrast_pairs(rows, random.Random(0))
    # The six examples answering 50 can only take the seventh's answer 51, and it only 50.
    assert len(pairs) == 7
    assert all(negative["input_ids"][-2] == 51 for _, negative in pairs[:6])
    assert pairs[6][1]["input_ids"][-2] == 50


@pytest.mark.parametrize("rows, words", [
    ([], ["empty dataset"]),
    ([{"text": "a question"}] * 10, ["input_ids", "chosen_input_ids", "['text']"]),
    (sft_rows(MIN_PAIRS - 1), [f"at least {MIN_PAIRS}", f"got {MIN_PAIRS - 1}"]),
    ([sft_row(prompt, 10) for prompt in prompts(12)], ["got 0", "12 of 12 examples left out",
                                                       "no other example has a different answer"]),
    ([{"input_ids": [1, 2, 3], "labels": [-100] * 3}] * 10, ["row 0 has no answer tokens"]),
], ids=["empty", "unknown keys", "too few", "one answer", "no answer"])
def test_errors_say_what_is_needed(rows, words):
    with pytest.raises(ValueError) as error:
        probe_ranking(tiny_model(), rows, SFTCollator(PAD))
    for word in words:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_validation_fraction_must_be_a_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        probe_ranking(tiny_model(), sft_rows(), SFTCollator(PAD), validation_fraction=fraction)


def test_probes_trained_together_equal_probes_trained_alone():
    """The vectorised fit against its reference: each probe fitted on its own."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 40, 7, generator=generator)
    labels = (features[:, :, 0].sum(0) + 0.5 * torch.randn(40, generator=generator) > 0).long()
    weight, bias = fit_probes(features, labels, steps=50)
    for probe in range(5):
        alone_weight, alone_bias = fit_probes(features[probe:probe + 1], labels, steps=50)
        torch.testing.assert_close(weight[probe], alone_weight[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bias[probe], alone_bias[0], atol=1e-5, rtol=1e-4)


def test_select_heads_with_the_probe_writes_a_loadable_ranking(tmp_path):
    model = tiny_model()
    with planted_signal(model):
        ranking = select_heads(model, sft_rows(), SFTCollator(PAD), localizer="probe", output_dir=str(tmp_path),
                               settings=StepSettings(seed=1, per_device_train_batch_size=16))
    saved = HeadRanking.load(tmp_path / "ranking.json")
    assert saved.ranking == ranking.ranking and saved.ranking[0][:2] == PLANTED
    assert saved.localizer == "probe" and saved.settings["seed"] == 1 and saved.settings["batch_size"] == 16


def test_cli_select_with_the_probe(tmp_path, capsys):
    save_tiny_model_and_tokenizer(tmp_path / "model")
    people = [("Anna", "Bob", "son"), ("Cleo", "Roy", "nephew"), ("Mary", "Kelly", "daughter"), ("Guy", "Ann", "aunt")]
    write_json_list(tmp_path / "clutrr.json", [clutrr_row(*names) for names in people * 3])
    status = main([str(arg) for arg in ["select", "--model", tmp_path / "model", "--task", "clutrr", "--data",
                                        tmp_path / "clutrr.json", "--output-dir", tmp_path / "out",
                                        "--localizer", "probe", "--seed", "2"]])
    assert status == 0 and "ranking: " in capsys.readouterr().out
    ranking = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert ranking["localizer"] == "probe" and ranking["settings"]["pairs"] == 12 and ranking["settings"]["seed"] == 2
    assert sorted((layer, head) for layer, head, _ in ranking["ranking"]) == ALL_HEADS
    assert all(0 <= score <= 1 for _, _, score in ranking["ranking"])
    assert (tmp_path / "out" / "heads.png").exists()
