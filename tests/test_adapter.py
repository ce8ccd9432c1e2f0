"""Adapter files (save / load, atomic writes, clear errors) and merge_and_unload (plain, bf16, bitsandbytes).

Tolerances, on logits of magnitude ~0.5 from tiny random models (measured values in brackets):
- fp32 merge vs patched model: atol 1e-5 [<= 2e-7]: the same products, summed in another order.
- bf16 merge: atol 2e-2 [4e-3]: the patched model rounds z' to bf16, the merged one rounds W * (1 + A)
  and the bias to bf16; both are one bf16 rounding (eps 7.8e-3) away from the fp32 function.
- 4-bit merge: atol 1e-5 [1e-7]: bitsandbytes dequantizes the weight and multiplies, so the bias fold
  is exact.
- 8-bit merge in training mode: atol 1e-5 [2e-7]: on the CPU bitsandbytes then multiplies by the
  dequantized weight, like 4-bit.
- 8-bit merge at inference: atol 2e-2 [3e-3 to 7e-3 over seeds and head sets]. LLM.int8 quantizes
  each input row to int8, so a change of 1e-6 in the residual stream can flip a rounding in a later
  layer; the merged model (W Q(z) + W v) and the patched one (W Q(z + v), or W Q(z) + W Q(v) for the
  offset fold) then differ by about one input quantization step, the same size as the int8-vs-fp32
  difference of the base model itself [6e-3], and far below the adapter's own effect [~0.6].
"""

import builtins
import json
import logging
import os
import warnings

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lofit_fast
from lofit_fast.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from lofit_fast.patch import attach

from helpers import tiny_model

# Heads in several layers, out of order: row i of the tensors must stay with HEADS[i].
HEADS = [(2, 5), (0, 1), (2, 0), (0, 4), (1, 3)]
IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8's "inputs will be cast to fp16"


def patched(model, scale=True, offset=True, heads=HEADS, magnitude=0.5, seed=1, trainable=True):
    """`model` patched on `heads` with random, clearly non-zero LoFiT parameters (frozen ones, as
    `load_adapter(..., trainable=False)` loads them, with trainable=False)."""
    handle = attach(model, heads, scale=scale, offset=offset, backend="torch", target_module=None, trainable=trainable)
    handle.lofit.initialize(magnitude, seed)
    return handle


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def leftovers(directory):
    return sorted(name for name in os.listdir(directory) if name not in (CONFIG_NAME, WEIGHTS_NAME))


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------

def test_save_writes_peft_layout(tmp_path):
    handle = patched(tiny_model("llama"), scale=False, offset=True)
    handle.method_settings = {"step": "tune", "learning_rate": 1e-2, "localizer": None}
    directory = tmp_path / "new" / "adapter"  # created, parents included
    handle.save_pretrained(directory)

    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((directory / CONFIG_NAME).read_text())
    save_id = config.pop("save_id")
    assert config == {
        "lofit_fast_version": lofit_fast.__version__, "architecture": "llama", "base_model_name_or_path": None,
        "num_layers": 3, "num_heads": 6, "head_dim": 12, "heads": [list(h) for h in HEADS],
        "scale": False, "offset": True, "method": handle.method_settings, "target_module": None,
    }
    with safetensors.safe_open(directory / WEIGHTS_NAME, framework="pt") as file:
        assert file.metadata() == {"format": "pt", "save_id": save_id} and len(save_id) == 32
    tensors = safetensors.torch.load_file(directory / WEIGHTS_NAME)
    assert list(tensors) == ["offset"]
    assert tensors["offset"].dtype == torch.float32 and tensors["offset"].is_contiguous()
    assert torch.equal(tensors["offset"], handle.offset.detach())


@pytest.mark.parametrize("scale, offset", [(False, True), (True, True), (True, False)])
def test_round_trip_gives_identical_parameters_and_logits(tmp_path, scale, offset):
    source = tiny_model("llama")
    handle = patched(source, scale=scale, offset=offset)
    handle.method_settings = {"step": "select", "l1_lambda": 5e-4}
    handle.save_pretrained(tmp_path)
    expected = logits(source)

    model = tiny_model("llama")  # same seed: the same base weights
    loaded = load_adapter(model, tmp_path, backend="torch")
    assert loaded.heads == HEADS
    for name in ("scale", "offset"):
        original, restored = getattr(handle, name), getattr(loaded, name)
        assert (original is None) == (restored is None)
        if original is not None:
            assert torch.equal(original, restored)
            assert restored.requires_grad  # training can resume
    assert torch.equal(logits(model), expected)
    assert loaded.method_settings == handle.method_settings
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("lofit.") for name in trainable)


def test_load_frozen(tmp_path):
    patched(tiny_model("llama")).save_pretrained(tmp_path)
    model = tiny_model("llama")
    load_adapter(model, tmp_path, backend="torch", trainable=False)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("model_type, overrides, difference", [
    ("llama", dict(num_hidden_layers=2), "layers differ (3 vs 2)"),
    ("llama", dict(num_attention_heads=4, num_key_value_heads=2), "heads differ (6 vs 4)"),
    ("llama", dict(head_dim=8), "head_dims differ (12 vs 8)"),
    ("qwen3", {}, "architectures differ (llama vs qwen3)"),
])
def test_load_into_another_shape_names_the_difference(tmp_path, model_type, overrides, difference):
    patched(tiny_model("llama")).save_pretrained(tmp_path)
    model = tiny_model(model_type, **overrides)
    with pytest.raises(ValueError, match="saved for 3 layers x 6 heads \\(head_dim 12\\) of llama") as error:
        load_adapter(model, tmp_path, backend="torch")
    assert difference in str(error.value)
    assert not hasattr(model, "lofit")  # nothing was patched


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(tiny_model("llama"), tmp_path / "nowhere")
    patched(tiny_model("llama")).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter(tiny_model("llama"), tmp_path)


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / CONFIG_NAME).write_text("{ not json"), f"{CONFIG_NAME} is not valid JSON"),
    (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: _edit_config(d, heads=None, head_dim=None), "missing the key\\(s\\) head_dim, heads"),
    (lambda d: _edit_config(d, heads=[[0, 9]]), "head \\[0, 9\\] is outside"),
    (lambda d: _edit_config(d, heads=[[0, 1], [0, 1]]), "listed twice"),
    (lambda d: _edit_config(d, heads=[["a", 1]]), "pairs of integers"),
    (lambda d: _edit_config(d, scale=False), "holds the tensors \\['offset', 'scale'\\]"),
    (lambda d: _edit_config(d, heads=[[0, 1]]), "tensor 'scale' has shape \\(5, 12\\), expected \\(1, 12\\)"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-40]), "truncated or corrupt"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00" * 7), "truncated or corrupt"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\xff" * 8 + b"garbage"), "truncated or corrupt"),
    (lambda d: safetensors.torch.save_file({"scale": torch.zeros(5, 12), "offset": torch.zeros(5, 11)},
                                           d / WEIGHTS_NAME), "tensor 'offset' has shape \\(5, 11\\)"),
    (lambda d: safetensors.torch.save_file({"scale": torch.zeros(5, 12, dtype=torch.int32),
                                            "offset": torch.zeros(5, 12)}, d / WEIGHTS_NAME), "floating point"),
])
def test_damaged_adapter_raises_value_error_naming_the_file(tmp_path, damage, message):
    patched(tiny_model("llama")).save_pretrained(tmp_path)
    damage(tmp_path)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(model, tmp_path, backend="torch")
    assert CONFIG_NAME in str(error.value) or WEIGHTS_NAME in str(error.value)
    assert not hasattr(model, "lofit")


def test_save_twice_over_an_existing_adapter(tmp_path):
    patched(tiny_model("llama"), seed=1).save_pretrained(tmp_path)
    second = patched(tiny_model("llama"), scale=False, heads=[(1, 2)], seed=2)
    second.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert leftovers(tmp_path) == []
    loaded = load_adapter(tiny_model("llama"), tmp_path, backend="torch")
    assert loaded.heads == [(1, 2)] and loaded.scale is None
    assert torch.equal(loaded.offset, second.offset)


def _partial_then_crash(write):
    def crash(*args, **kwargs):
        write(*args, **kwargs)
        raise OSError("disk full (simulated)")

    return crash


@pytest.mark.parametrize("target", ["safetensors", "json"])
def test_crash_mid_save_leaves_the_old_adapter(tmp_path, monkeypatch, target):
    old = patched(tiny_model("llama"), seed=1)
    old.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}

    if target == "safetensors":
        def partial(tensors, path, metadata=None):
            with open(path, "wb") as file:
                file.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"scale\"")
        monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_crash(partial))
    else:  # the config file: its first write runs out of disk
        def open_then_crash(path, mode="r", **kwargs):
            file = builtins.open(path, mode, **kwargs)
            if "w" in mode:
                with file:
                    file.write('{"heads": [[')
                raise OSError("disk full (simulated)")
            return file
        monkeypatch.setattr(lofit_fast.io, "open", open_then_crash, raising=False)
    new = patched(tiny_model("llama"), scale=False, heads=[(0, 0)], seed=2)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(tmp_path)

    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert leftovers(tmp_path) == []
    loaded = load_adapter(tiny_model("llama"), tmp_path, backend="torch")
    assert torch.equal(loaded.scale, old.scale)


def test_crash_between_the_two_renames_is_detected_on_load(tmp_path, monkeypatch):
    """New weights beside the old config (the config's rename never happened): same heads and shapes, so only the
    shared save_id tells the two saves apart; loading must refuse rather than pair them."""
    patched(tiny_model("llama"), seed=1).save_pretrained(tmp_path)
    replace = os.replace
    renames = []

    def crash_on_the_config(source, target):
        renames.append(os.path.basename(target))
        if os.path.basename(target) == CONFIG_NAME:
            raise OSError("power cut (simulated)")
        replace(source, target)

    monkeypatch.setattr(lofit_fast.io.os, "replace", crash_on_the_config)
    with pytest.raises(OSError, match="simulated"):
        patched(tiny_model("llama"), seed=2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert renames == [WEIGHTS_NAME, CONFIG_NAME] and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="different saves.*save the adapter again"):
        load_adapter(tiny_model("llama"), tmp_path, backend="torch")
    # An adapter saved before save_id existed (no id in either file) still loads.
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["save_id"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    assert load_adapter(tiny_model("llama"), tmp_path, backend="torch").heads == HEADS


def test_unserialisable_method_settings_fail_before_anything_is_replaced(tmp_path):
    handle = patched(tiny_model("llama"))
    handle.save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()
    handle.method_settings = {"dtype": torch.float32}
    with pytest.raises(ValueError, match="method_settings"):
        handle.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Merging into plain weights
# ----------------------------------------------------------------------------------------------

def assert_plain(model, base_trainable=True):
    """No LoFiT left: no module, no parameters, no hooks; with base_trainable, the base flags as before
    patching (all trainable; a quantized base's weights never are)."""
    assert not hasattr(model, "lofit")
    assert not any("lofit" in name for name, _ in model.named_parameters())
    for layer in model.model.layers:
        o_proj = layer.self_attn.o_proj
        assert not o_proj._forward_pre_hooks and not o_proj._forward_hooks
    if base_trainable:
        assert all(p.requires_grad for p in model.parameters())


# gemma and qwen3 have heads * head_dim (72) != hidden (48), like Gemma-7B and Qwen3.
@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen3"])
@pytest.mark.parametrize("scale, offset", [(False, True), (True, True), (True, False)])
def test_merge_matches_the_patched_model(model_type, scale, offset):
    model = tiny_model(model_type)
    base = logits(model)
    handle = patched(model, scale=scale, offset=offset)
    expected = logits(model)
    assert (expected - base).abs().max() > 1e-2  # the adapter does something
    merged = handle.merge_and_unload()
    assert merged is model
    assert_plain(merged)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_merge_keeps_unselected_columns_and_adds_to_an_existing_bias():
    model = tiny_model("llama", attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    handle = patched(model, heads=[(1, 3), (1, 0)])
    expected = logits(model)
    merged = handle.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    changed = {name for name, p in merged.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.bias"}
    weight, original = merged.model.layers[1].self_attn.o_proj.weight, before["model.layers.1.self_attn.o_proj.weight"]
    untouched = [c for c in range(72) if c // 12 not in (0, 3)]
    assert torch.equal(weight[:, untouched], original[:, untouched])


def test_merge_bf16_model():
    model = tiny_model("llama").to(torch.bfloat16)
    handle = patched(model)
    expected = logits(model)
    merged = handle.merge_and_unload()
    assert merged.model.layers[0].self_attn.o_proj.bias.dtype == torch.bfloat16
    torch.testing.assert_close(logits(merged), expected, atol=2e-2, rtol=0)


def test_merged_model_saves_and_reloads_with_its_biases(tmp_path):
    model = tiny_model("llama")
    handle = patched(model)
    expected = logits(model)
    merged = handle.merge_and_unload()
    assert merged.config.attention_bias is True  # so from_pretrained builds the o_proj biases
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)


def test_merge_of_a_removed_handle_raises():
    handle = patched(tiny_model("llama"))
    handle.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.merge_and_unload()


# ----------------------------------------------------------------------------------------------
# Merging into bitsandbytes weights (on the CPU)
# ----------------------------------------------------------------------------------------------

def quantized(directory, bits):
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu")


def quantized_weights(model):
    return [layer.self_attn.o_proj.weight.data.clone() for layer in model.model.layers]


@pytest.mark.parametrize("bits, mode, atol", [(4, "eval", 1e-5), (8, "train", 1e-5), (8, "eval", 2e-2)])
@pytest.mark.parametrize("scale", [False, True])  # True: a scale that is present but zero
def test_merge_offsets_into_quantized_o_proj(quantizable_base, bits, mode, atol, scale):
    model = getattr(quantized(quantizable_base, bits), mode)()
    base = logits(model)
    weights = quantized_weights(model)
    if bits == 4 and model.model.layers[0].self_attn.o_proj.support_avx512bf16_for_cpu:
        # The base call above has repacked the 4-bit weights for bitsandbytes' bf16 CPU kernel (an AVX512-BF16
        # CPU): an adapter for inference runs on it, as the merged model will; the kernel rounds its input and
        # output to bf16, the patched model's offsets with its input, the merged bias not (2 bf16 eps).
        atol = 2 * torch.finfo(torch.bfloat16).eps
    # Frozen, as `lofit merge` loads it: a trainable adapter would refuse repacked weights.
    handle = patched(model, scale=scale, trainable=False)
    if scale:
        with torch.no_grad():
            handle.scale.zero_()
    expected = logits(model)
    assert (expected - base).abs().max() > 0.1
    merged = handle.merge_and_unload()
    assert_plain(merged, base_trainable=False)
    assert all(torch.equal(a, b) for a, b in zip(quantized_weights(merged), weights))  # weights untouched
    torch.testing.assert_close(logits(merged), expected, atol=atol, rtol=0)




def test_8bit_merge_before_the_first_forward_call(quantizable_base):
    """LLM.int8 keeps its int8 weight on the parameter until the first call, in its state after it."""
    first, second = quantized(quantizable_base, 8), quantized(quantizable_base, 8)
    logits(first)
    merged = [patched(model, scale=False).merge_and_unload() for model in (first, second)]
    assert torch.equal(logits(merged[0]), logits(merged[1]))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_merge_refuses_non_zero_scales_and_changes_nothing(quantizable_base, bits):
    model = quantized(quantizable_base, bits)
    handle = patched(model, scale=True)
    expected = logits(model)
    with pytest.raises(ValueError, match="unquantized copy of the base model, or keep the adapter unmerged"):
        handle.merge_and_unload()
    assert hasattr(model, "lofit") and all(layer.self_attn.o_proj.bias is None for layer in model.model.layers)
    assert torch.equal(logits(model), expected)


def test_quantized_merged_model_saves_and_reloads(quantizable_base, tmp_path):
    model = quantized(quantizable_base, 4)
    merged = patched(model, scale=False).merge_and_unload()
    # Saved before the first eval-mode call: on an AVX512-BF16 CPU that call repacks the 4-bit weights, and
    # bitsandbytes (0.50) then saves wrong block scales (its unpacking leaves them transposed).
    merged.save_pretrained(tmp_path)
    expected = logits(merged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert torch.equal(logits(reloaded), expected)


# ----------------------------------------------------------------------------------------------
# Non-finite values are refused, in the tensors and in adapter_config.json
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters_are_not_saved(tmp_path, value):
    handle = patched(tiny_model("llama"), heads=[(0, 1), (2, 3)])
    handle.save_pretrained(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with torch.no_grad():
        handle.offset[1, 3] = value
    with pytest.raises(ValueError, match="offset.*1 non-finite"):
        handle.save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_non_finite_tensors_and_config_values_are_refused_on_load(tmp_path):
    handle = patched(tiny_model("llama"), scale=False, heads=[(0, 1), (2, 3)])
    handle.save_pretrained(tmp_path)
    offset = torch.zeros(2, 12)
    offset[0, 0] = float("inf")
    safetensors.torch.save_file({"offset": offset}, tmp_path / WEIGHTS_NAME)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="offset.*non-finite"):
        load_adapter(model, tmp_path)
    assert not hasattr(model, "lofit")
    handle.save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text().replace('"method": {}', '"method": {"learning_rate": NaN}')
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match="NaN"):
        load_adapter(model, tmp_path)


def test_non_finite_method_settings_are_not_written(tmp_path):
    handle = patched(tiny_model("llama"), scale=False, heads=[(0, 1)])
    handle.method_settings = {"learning_rate": float("inf")}
    with pytest.raises(ValueError, match="JSON"):
        handle.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []
