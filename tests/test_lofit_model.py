"""The PEFT-shaped API (LofitConfig, get_lofit_model, LofitModel), copies of patched models, and LoFiT on a
model that also carries PEFT LoRA layers."""

import copy
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import lofit_fast
from lofit_fast import LofitConfig, LofitModel, get_lofit_model, patch_model
from lofit_fast.adapter import CONFIG_NAME
from lofit_fast.training import HeadRanking, random_ranking

from helpers import reference_hook_patch, tiny_model

HEADS = [(2, 5), (1, 0), (2, 0)]
HEAD_DIM = 12
IDS = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_logits(heads, scale, offset, seed=0):
    """Logits of a fresh base with the transform applied by the independent per-head hook."""
    base = tiny_model("llama", seed=seed)
    remove = reference_hook_patch(base, heads, scale, offset)
    try:
        return logits(base)
    finally:
        remove()


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="not both"):
        LofitConfig(heads=HEADS, k=2)
    with pytest.raises(ValueError, match="localizer"):
        LofitConfig(localizer="magic")
    with pytest.raises(ValueError, match="both off"):
        LofitConfig(scale=False, offset=False)
    with pytest.raises(ValueError, match="init_std"):
        LofitConfig(init_std=-1.0)
    config = LofitConfig(heads=[[1, 2]], scale=True)
    assert config.heads == [(1, 2)]
    assert LofitConfig.from_dict({**config.to_dict(), "from_a_newer_version": 1}) == config


def test_get_lofit_model_matches_the_reference_and_trains_only_lofit(capsys):
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True, offset=True, init_std=0.3))
    handle = model.handle
    assert handle.heads == HEADS and handle.scale.abs().min() > 0 and handle.offset.abs().min() > 0
    expected = reference_logits(HEADS, handle.scale.detach(), handle.offset.detach())
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["wrapped_model.lofit.scale", "wrapped_model.lofit.offset"]
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (2 * len(HEADS) * HEAD_DIM, total)
    model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    assert printed == (f"trainable params: {2 * len(HEADS) * HEAD_DIM:,d} || all params: {total:,d} || "
                       f"trainable%: {100 * 2 * len(HEADS) * HEAD_DIM / total:.4f}")
    # Attributes of the model pass through the wrapper.
    assert model.config.model_type == "llama" and model.get_base_model() is model.wrapped_model


def test_init_is_seeded_and_zero_std_is_the_base_model():
    first = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, seed=3))
    second = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, seed=3))
    other = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, seed=4))
    assert torch.equal(first.handle.offset, second.handle.offset)
    assert not torch.equal(first.handle.offset, other.handle.offset)
    assert first.handle.offset.std().item() == pytest.approx(1e-3, rel=0.5)
    identity = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True, init_std=0.0))
    torch.testing.assert_close(logits(identity), logits(tiny_model("llama")), rtol=0, atol=0)


def test_k_takes_the_top_heads_of_a_ranking(tmp_path):
    base = tiny_model("llama")
    scores = [(layer, head, float(layer * 6 + head)) for layer in range(3) for head in range(6)]
    ranking = HeadRanking(sorted(scores, key=lambda item: -item[2]), num_layers=3, num_heads=6)
    assert get_lofit_model(tiny_model("llama"), LofitConfig(k=2), ranking=ranking).handle.heads == [(2, 5), (2, 4)]

    ranking.save(tmp_path / "ranking.json")
    from_file = get_lofit_model(tiny_model("llama"), LofitConfig(k=3, ranking=tmp_path / "ranking.json"))
    assert from_file.handle.heads == [(2, 5), (2, 4), (2, 3)]
    assert from_file.handle.method_settings["localizer"] == "lofit"

    random_model = get_lofit_model(tiny_model("llama"), LofitConfig(k=0.25, localizer="random", seed=7))
    assert random_model.handle.heads == random_ranking(base, seed=7).top(0.25)

    with pytest.raises(ValueError, match="select_heads"):
        get_lofit_model(tiny_model("llama"), LofitConfig(k=2))
    with pytest.raises(ValueError, match="config.k is None"):
        get_lofit_model(tiny_model("llama"), LofitConfig(), ranking=ranking)
    every_head = get_lofit_model(tiny_model("llama"), LofitConfig(scale=True, offset=False))
    assert len(every_head.handle.heads) == 18


def test_disable_adapter_gives_the_base_model():
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True, init_std=0.3))
    base = logits(tiny_model("llama"))
    assert not torch.allclose(logits(model), base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    assert not torch.allclose(logits(model), base)


def test_save_and_from_pretrained_round_trip(tmp_path):
    config = LofitConfig(heads=HEADS, scale=True, offset=True, init_std=0.3, seed=5)
    model = get_lofit_model(tiny_model("llama"), config)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["method"]["lofit_config"]["seed"] == 5 and saved["heads"] == [list(h) for h in HEADS]

    loaded = LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.lofit_config.heads == HEADS and loaded.lofit_config.scale and loaded.lofit_config.seed == 5
    assert not any(p.requires_grad for p in loaded.parameters()), "PEFT loads adapters frozen by default"
    trainable = LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["wrapped_model.lofit.scale",
                                                                             "wrapped_model.lofit.offset"]

    # An adapter written by the core API (no LofitConfig inside) loads too.
    core = patch_model(tiny_model("llama"), HEADS, scale=False)
    core.save_pretrained(tmp_path / "core")
    from_core = LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "core")
    assert from_core.lofit_config == LofitConfig(heads=HEADS, scale=False, offset=True)

    with pytest.raises(ValueError, match="saved for 3 layers"):
        LofitModel.from_pretrained(tiny_model("llama", num_hidden_layers=2), tmp_path / "adapter")


def test_merge_and_unload_and_unload():
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True, init_std=0.3))
    expected = logits(model)
    merged = model.merge_and_unload()
    assert not hasattr(merged, "lofit") and type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)

    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.3))
    plain = model.unload()
    torch.testing.assert_close(logits(plain), logits(tiny_model("llama")), rtol=0, atol=0)
    assert all(p.requires_grad for p in plain.parameters())


def test_target_module_is_used_and_saved(tmp_path):
    config = LofitConfig(heads=HEADS, scale=True, init_std=0.3, target_module="self_attn.o_proj")
    model = get_lofit_model(tiny_model("llama"), config)
    default = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True, init_std=0.3))
    torch.testing.assert_close(logits(model), logits(default), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["target_module"] == "self_attn.o_proj"
    assert LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").handle.target_module == \
        "self_attn.o_proj"
    with pytest.raises(ValueError, match="self_attn.out_proj.*check target_module"):
        get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, target_module="self_attn.out_proj"))


def test_trainer_trains_a_lofit_model(tmp_path):
    """transformers.Trainer takes the wrapper as it takes a PeftModel: columns kept, only LoFiT updated."""
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True, init_std=0.01))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 97, (8, 10), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row, "unused": 0} for row in ids]
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                  learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                                  disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=arguments, train_dataset=rows).train()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
        else:
            assert not torch.equal(parameter, before[name]), name


def test_trainer_accepts_a_lofit_model_on_a_4bit_base(tmp_path):
    directory = tmp_path / "base"
    tiny_model("llama").save_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    lofit_fast.prepare_kbit_training(quantized)
    model = get_lofit_model(quantized, LofitConfig(heads=HEADS, init_std=0.01))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == len(HEADS) * HEAD_DIM
    # Params4bit holds two values per byte: counted as the weights it stands for, like PEFT.
    assert total == sum(p.numel() for p in tiny_model("llama").parameters()) + trainable
    before = model.handle.offset.detach().clone()
    rows = [{"input_ids": row, "labels": row} for row in torch.randint(3, 97, (4, 8))]
    arguments = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                  learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                                  disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=arguments, train_dataset=rows).train()
    assert not torch.equal(model.handle.offset, before)


@pytest.mark.parametrize("scale", [True, False], ids=["transform-hook", "offset-fold-hook"])
def test_deepcopy_of_a_patched_model_is_independent(scale):
    model = tiny_model("llama")
    handle = patch_model(model, HEADS, scale=scale, offset=True)
    with torch.no_grad():
        handle.offset.normal_(0, 0.5)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(logits(copied), logits(model), rtol=0, atol=0)
    with torch.no_grad():
        copied.lofit.offset.zero_()
        if scale:
            copied.lofit.scale.zero_()
    torch.testing.assert_close(logits(copied), logits(tiny_model("llama")), rtol=0, atol=0)
    assert not torch.allclose(logits(model), logits(copied))
    with handle.disabled():  # switching the original off leaves the copy on
        torch.testing.assert_close(logits(model), logits(tiny_model("llama")), rtol=0, atol=0)
        copied.lofit.offset.data.fill_(0.1)
        assert not torch.allclose(logits(copied), logits(tiny_model("llama")))


# ----------------------------------------------------------------------------------------------
# LoFiT together with PEFT LoRA
# ----------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def lora_model(target_modules, seed=0):
    """A tiny llama with LoRA on `target_modules`, its B matrices random so LoRA changes the outputs."""
    model = peft.get_peft_model(tiny_model("llama", seed=seed),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0))
    torch.manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["o_proj"]], ids=["lora-qv", "lora-on-o_proj"])
@pytest.mark.parametrize("scale", [True, False], ids=["scale+offset", "offset"])
def test_lofit_on_a_lora_model_matches_the_reference(target_modules, scale):
    model = lora_model(target_modules)
    handle = patch_model(model, HEADS, scale=scale, offset=True)
    assert handle.model is model.get_base_model() and hasattr(model.get_base_model(), "lofit")
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in handle.lofit.parameters():
            parameter.normal_(0, 0.3)
    # The reference hook on the same o_proj modules (LoRA wrappers, where LoRA targets o_proj).
    reference = lora_model(target_modules)
    o_projs = [layer.self_attn.o_proj for layer in reference.get_base_model().model.layers]
    remove = reference_hook_patch(reference, HEADS, handle.scale.detach() if scale else None,
                                  handle.offset.detach(), o_projs=o_projs, num_heads=6)
    try:
        torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    finally:
        remove()
    # LoRA is frozen with the rest; LoFiT trains alone unless LoRA is switched back on.
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".lofit." in n]


def test_lofit_and_lora_train_together_and_reload(tmp_path):
    model = lora_model(["q_proj", "v_proj"])
    handle = patch_model(model, HEADS, scale=False, offset=True)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    model.train()
    for _ in range(2):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert handle.offset.abs().max() > 0
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_A" in n)

    model.save_pretrained(tmp_path / "lora")  # PEFT writes the LoRA weights only
    handle.save_pretrained(tmp_path / "lofit")
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora")
    lofit_fast.load_adapter(reloaded, tmp_path / "lofit")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)

    # Merging both: PEFT's merge first (it hands back the inner model, LoFiT's hooks on it), then LoFiT's.
    expected = logits(model)
    plain = model.merge_and_unload()
    assert plain is handle.model and not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)
    merged = handle.merge_and_unload()
    assert merged is plain and not hasattr(merged, "lofit") and merged.config.attention_bias
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Trainer checkpoints, k-bit preparation of wrapped models, loads that fail
# ----------------------------------------------------------------------------------------------

def checkpointing_run(output_dir, resume_from_checkpoint=None):
    """A LofitModel on a base with tied embeddings, 4 steps with a checkpoint every 2, through a Trainer that
    takes `LofitCheckpointing`. Returns (the model, the trainer)."""
    from lofit_fast.training import LofitCheckpointing

    class CheckpointingTrainer(LofitCheckpointing, Trainer):
        pass

    model = get_lofit_model(tiny_model("llama", tie_word_embeddings=True),
                            LofitConfig(heads=HEADS, scale=True, init_std=0.01))
    ids = torch.randint(3, 97, (8, 10), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    arguments = TrainingArguments(output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2,
                                  per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", use_cpu=True,
                                  disable_tqdm=True, logging_strategy="no", seed=3)
    trainer = CheckpointingTrainer(model=model, args=arguments, train_dataset=rows)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return model, trainer


def test_trainer_checkpoints_of_a_lofit_model_hold_the_adapter_and_resume_exactly(tmp_path):
    model, trainer = checkpointing_run(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {path.name for path in checkpoint.iterdir()}
    assert {CONFIG_NAME, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # not the base model
    assert LofitModel.from_pretrained(tiny_model("llama"), checkpoint).handle.heads == HEADS

    trainer.save_model(tmp_path / "final")
    loaded = LofitModel.from_pretrained(tiny_model("llama", tie_word_embeddings=True), tmp_path / "final")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)

    resumed, _ = checkpointing_run(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    for name in ("scale", "offset"):
        assert torch.equal(getattr(resumed.handle, name), getattr(model.handle, name)), name


def test_prepare_kbit_training_keeps_lofit_trainable_inside_wrappers(tmp_path):
    """Parameter names of LoFiT inside a LofitModel, a PEFT model and a multi-adapter bank do not start with
    'lofit.'; prepare_kbit_training must still leave them trainable."""
    wrapped = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, scale=True))
    lofit_fast.prepare_kbit_training(wrapped)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == ["wrapped_model.lofit.scale",
                                                                           "wrapped_model.lofit.offset"]
    with_lora = lora_model(["q_proj"])
    patch_model(with_lora, HEADS)
    lofit_fast.prepare_kbit_training(with_lora)
    assert [n for n, p in with_lora.named_parameters() if p.requires_grad] == ["base_model.model.lofit.scale",
                                                                             "base_model.model.lofit.offset"]
    patch_model(tiny_model("llama"), HEADS).save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    lofit_fast.load_adapters(model, {"qa": tmp_path / "adapter"}, trainable=True)
    lofit_fast.prepare_kbit_training(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lofit_adapters.qa.scale",
                                                                         "lofit_adapters.qa.offset"]


def test_from_pretrained_checks_everything_before_touching_the_model(tmp_path):
    get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.3)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    broken = copy.deepcopy(saved)
    broken["method"]["lofit_config"]["localizer"] = "magic"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(broken))
    base = tiny_model("llama")
    expected = logits(base)
    with pytest.raises(ValueError, match="localizer='magic'"):
        LofitModel.from_pretrained(base, tmp_path)
    assert not hasattr(base, "lofit") and all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(logits(base), expected, rtol=0, atol=0)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved))
    loaded = LofitModel.from_pretrained(base, tmp_path)  # the retry finds the model as it was
    assert loaded.handle.heads == HEADS and not loaded.lofit_config.scale


@pytest.mark.parametrize("init_std", [float("nan"), float("inf")])
def test_config_refuses_a_non_finite_init_std(init_std):
    with pytest.raises(ValueError, match="init_std"):
        LofitConfig(init_std=init_std)


def test_a_lofit_model_whose_adapter_was_removed_says_so():
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS))
    model.unload()
    assert "removed" in repr(model)
    with pytest.raises(RuntimeError, match="removed"):
        with model.disable_adapter():
            pass


def test_a_seed_gives_the_same_start_through_every_api(monkeypatch):
    """tune() (and select_heads) and get_lofit_model draw the initial vectors the same way: one seed, one start."""
    from lofit_fast import training

    monkeypatch.setattr(training, "_train", lambda *args, **kwargs: None)  # the start, before any step
    settings = training.StepSettings(init_std=0.3, seed=7)
    tuned = training.tune(tiny_model("llama"), [], None, heads=HEADS, settings=settings, backend="torch")
    wrapped = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.3, seed=7))
    assert tuned.offset.abs().max() > 0.1
    assert torch.equal(tuned.offset.detach(), wrapped.handle.offset.detach())
