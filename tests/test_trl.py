"""TRL's SFTTrainer and DPOTrainer train a LoFiT-patched model as they are: no subclass, no extra arguments."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import lofit_fast
from lofit_fast import LofitConfig, get_lofit_model

from helpers import save_tiny_model_and_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

HEADS = [(2, 5), (1, 0), (2, 0)]
PROMPTS = ["Q: What is the capital of France? A:", "Q: Can pigs fly? A:", "Q: Imagine that Bob is Anna 's son. A:",
           "Read the following story about a family. Answer:"]
GOOD = [" Rome", " No, pigs cannot fly.", " Bob is Anna 's son", " Anna is the mother of Bob."]
BAD = [" I have no comment.", " Yes, pigs can fly.", " Bob is Anna 's uncle", " Anna is the aunt of Bob."]
COMMON = dict(max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2, report_to="none", save_strategy="no",
              use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    _, tokenizer = save_tiny_model_and_tokenizer(directory)
    return directory, tokenizer


def load(directory):
    return AutoModelForCausalLM.from_pretrained(directory)


def sft_dataset():
    """Prompt-completion rows, TRL's SFT format."""
    return datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in zip(PROMPTS, GOOD)])


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def assert_only_lofit_changed(model, before):
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    lofit = {name for name in before if ".lofit." in f".{name}"}
    assert changed == lofit, f"changed: {sorted(changed)}; LoFiT parameters: {sorted(lofit)}"


def test_sft_trainer_trains_a_patched_model(saved_base, tmp_path):
    """With TRL's defaults, gradient checkpointing included."""
    directory, tokenizer = saved_base
    model = load(directory)
    handle = lofit_fast.patch_model(model, HEADS, scale=True, offset=True)
    with torch.no_grad():
        handle.scale.normal_(0, 1e-3)
        handle.offset.normal_(0, 1e-3)
    before = snapshot(model)
    dataset = sft_dataset()
    config = trl.SFTConfig(output_dir=str(tmp_path), **COMMON)
    assert config.gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert_only_lofit_changed(model, before)


def test_sft_trainer_trains_a_lofit_model(saved_base, tmp_path):
    """The PEFT-shaped wrapper goes to SFTTrainer as a PeftModel would; the saved adapter reloads."""
    directory, tokenizer = saved_base
    model = get_lofit_model(load(directory), LofitConfig(heads=HEADS, scale=False, offset=True))
    before = model.handle.offset.detach().clone()
    dataset = sft_dataset()
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), gradient_checkpointing=False, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train()
    assert not torch.equal(model.handle.offset, before)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = lofit_fast.LofitModel.from_pretrained(load(directory), tmp_path / "adapter")
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    # The trained model itself, not the wrapper: accelerate leaves the wrapper's forward under TRL's bf16 autocast.
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.get_base_model()(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_dpo_trainer_trains_a_patched_model_against_the_base(saved_base, tmp_path):
    """With no ref_model, DPOTrainer loads the reference from the model's config path: the unpatched base."""
    directory, tokenizer = saved_base
    model = load(directory)
    handle = lofit_fast.patch_model(model, HEADS, scale=False, offset=True)
    with torch.no_grad():
        handle.offset.normal_(0, 1e-3)
    before = snapshot(model)
    dataset = datasets.Dataset.from_list([{"prompt": p, "chosen": g, "rejected": b}
                                          for p, g, b in zip(PROMPTS, GOOD, BAD)])
    config = trl.DPOConfig(output_dir=str(tmp_path), gradient_checkpointing=False, beta=0.5, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    assert_only_lofit_changed(model, before)
    reference = trainer.ref_model
    assert reference is not None and not hasattr(reference, "lofit")
    base = load(directory)
    for (name, parameter), (_, expected) in zip(reference.named_parameters(), base.named_parameters()):
        assert torch.equal(parameter, expected), name


def test_prepared_checkpointing_keeps_backward_above_the_lowest_tuned_layer(saved_base, tmp_path):
    """The README's recipe: TRL's own checkpointing makes backward run through every layer (it turns on
    enable_input_require_grads); prepare_kbit_training's does not."""
    directory, tokenizer = saved_base
    dataset = sft_dataset()
    reached = {}
    for recipe in ("trl", "lofit_fast"):
        model = load(directory)
        lofit_fast.patch_model(model, [(2, 1)], scale=False, offset=True)
        if recipe == "lofit_fast":
            lofit_fast.prepare_kbit_training(model, gradient_checkpointing=True)
        reached[recipe] = []
        for index, layer in enumerate(model.model.layers):
            layer.register_full_backward_hook(lambda *_, index=index, seen=reached[recipe]: seen.append(index))
        config = trl.SFTConfig(output_dir=str(tmp_path / recipe), gradient_checkpointing=recipe == "trl",
                               **{**COMMON, "max_steps": 1})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train()
        assert model.is_gradient_checkpointing
    assert reached == {"trl": [2, 1, 0], "lofit_fast": [2]}
