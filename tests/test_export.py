"""Exporting a LoFiT adapter as a PEFT LoRA adapter: stock PEFT, in a process that never imports lofit_fast
(tests/fresh_process.py), reproduces the patched model's logits and greedy generation.

Tolerance: fp32 logits of magnitude ~0.5, atol 1e-5 [measured <= 2e-7]: PEFT adds lora_B(lora_A(z)) to
o_proj(z), LoFiT multiplies o_proj by (1 + a) z + v: the same products summed in another order.
"""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lofit_fast
from lofit_fast.cli import main
from lofit_fast.export import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

from fresh_process import QUANTIZATIONS, run_and_generate, run_in_fresh_process
from helpers import QUANTIZABLE_CONFIG, assert_same_greedy_run

pytest.importorskip("peft")

HEADS = [(2, 5), (0, 1), (2, 0), (1, 3)]
IDS = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
MAX_NEW_TOKENS = 5
ATOL = 1e-5
MODES = {"scale+offset": dict(scale=True, offset=True), "offset": dict(scale=False, offset=True),
         "scale": dict(scale=True, offset=False)}
CASES = [("plain", "scale+offset"), ("plain", "offset"), ("plain", "scale"), ("nf4-fp32", "scale+offset"),
         ("nf4-fp32", "offset")]


def load_base(directory, quantization):
    if quantization == "plain":
        return AutoModelForCausalLM.from_pretrained(directory).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            directory, device_map="cpu", quantization_config=BitsAndBytesConfig(**QUANTIZATIONS[quantization])).eval()


def patched(model, mode, seed=1):
    """Random, clearly non-zero parameters; a few scale entries exactly zero (they need no LoRA rank)."""
    handle = lofit_fast.patch_model(model, HEADS, backend="torch", **MODES[mode])
    handle.lofit.initialize(0.5, seed)
    with torch.no_grad():
        if handle.scale is not None:
            handle.scale[1, :5] = 0.0  # head (0, 1): the only head of layer 0
    return handle


@pytest.fixture(scope="module")
def exported(quantizable_base, tmp_path_factory):
    """Every case exported, with the patched model's outputs, and what stock PEFT computes from the exports."""
    root = tmp_path_factory.mktemp("exports")
    expected, cases = {}, {}
    for quantization, mode in CASES:
        name = f"{quantization}-{mode}"
        handle = patched(load_base(quantizable_base, quantization), mode)
        expected[name] = run_and_generate(handle.model, IDS, MAX_NEW_TOKENS)
        handle.export_peft_lora(root / name)
        cases[name] = {"model": str(quantizable_base), "adapter": str(root / name),
                       "quantization": None if quantization == "plain" else quantization}
    results = run_in_fresh_process({"input_ids": IDS.tolist(), "max_new_tokens": MAX_NEW_TOKENS, "cases": cases}, root)
    return root, expected, results


def test_stock_peft_never_imports_lofit_fast(exported):
    assert exported[2]["lofit_fast_imported"] is False


@pytest.mark.parametrize("quantization, mode", CASES)
def test_stock_peft_reproduces_logits_and_greedy_generation(exported, quantization, mode):
    _, expected, actual = exported
    name = f"{quantization}-{mode}"
    logits, tokens, step_logits = expected[name]
    torch.testing.assert_close(actual[name]["logits"], logits, atol=ATOL, rtol=0)
    assert_same_greedy_run(actual[name]["tokens"], actual[name]["step_logits"], tokens, step_logits, atol=ATOL)


def test_each_layer_gets_the_smallest_exact_rank(exported):
    root = exported[0]
    for mode, bias in (("scale+offset", True), ("offset", False), ("scale", None)):
        config = json.loads((root / f"plain-{mode}" / PEFT_CONFIG_NAME).read_text())
        tensors = load_file(root / f"plain-{mode}" / PEFT_WEIGHTS_NAME)
        ranks = {name: config["rank_pattern"].get(name, config["r"]) for name in config["target_modules"]}
        # Only the patched layers; a scale of head_dim features per head but the 5 zero entries of layer 0.
        head_dim = QUANTIZABLE_CONFIG["head_dim"]
        expected_ranks = ({"model.layers.0.self_attn.o_proj": head_dim - 5, "model.layers.1.self_attn.o_proj": head_dim,
                           "model.layers.2.self_attn.o_proj": 2 * head_dim} if mode != "offset" else
                          dict.fromkeys(["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
                                         "model.layers.2.self_attn.o_proj"], 1))
        assert ranks == expected_ranks
        assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"]
        assert config["peft_type"] == "LORA" and config["lora_bias"] == MODES[mode]["offset"]
        assert config["lora_dropout"] == 0.0 and config["task_type"] == "CAUSAL_LM"
        biases = [key for key in tensors if key.endswith("lora_B.bias")]
        assert len(biases) == (3 if MODES[mode]["offset"] else 0)
        if bias is False:  # offsets only: lora_A / lora_B are zero, the bias carries everything
            assert all(not tensor.any() for key, tensor in tensors.items() if key.endswith(".weight"))
        assert all(tensor.dtype == torch.float32 for tensor in tensors.values())


def test_the_command_line_and_lofit_model_export_the_same(quantizable_base, tmp_path, capsys):
    handle = patched(load_base(quantizable_base, "plain"), "scale+offset")
    handle.save_pretrained(tmp_path / "adapter")
    handle.export_peft_lora(tmp_path / "from_handle")
    model = lofit_fast.LofitModel.from_pretrained(load_base(quantizable_base, "plain"), tmp_path / "adapter")
    model.export_peft_lora(tmp_path / "from_lofit_model")
    status = main(["export", "--model", str(quantizable_base), "--adapter", str(tmp_path / "adapter"), "--format",
                   "peft-lora", "--output-dir", str(tmp_path / "from_cli")])
    assert status == 0 and "from_cli" in capsys.readouterr().out
    reference = load_file(tmp_path / "from_handle" / PEFT_WEIGHTS_NAME)
    for other in ("from_lofit_model", "from_cli"):
        tensors = load_file(tmp_path / other / PEFT_WEIGHTS_NAME)
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[key], reference[key]) for key in reference)


def test_a_failed_export_leaves_an_earlier_one_as_it_was(quantizable_base, tmp_path):
    handle = patched(load_base(quantizable_base, "plain"), "offset")
    handle.export_peft_lora(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)}
    with torch.no_grad():
        handle.offset[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        handle.export_peft_lora(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.export_peft_lora(tmp_path)
