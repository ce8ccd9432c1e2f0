"""Merging for a serving engine (`merge_and_unload(engine=...)`, `lofit merge --for`): the merged checkpoint keeps
its offsets in the named engine, or the merge is refused and nothing changes.

What runs here: transformers, in a fresh process that never imports lofit_fast (tests/fresh_process.py). vLLM's
and SGLang's rules are those written down in lofit_fast/serving.py from their sources; the expectations below
restate them per architecture, independently of that table.
"""

import contextlib
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

import lofit_fast
from lofit_fast.cli import main

from fresh_process import run_in_fresh_process
from helpers import save_tiny_model_and_tokenizer, tiny_model

IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
HEADS = [(2, 5), (0, 1), (1, 3)]

# (model_type, engine) -> "flag" (config.attention_bias), "relabel" (becomes Llama), "refused". The tiny models
# have max_position_embeddings 128 and Mistral's default sliding window (4096), so none applies.
EXPECTED = {
    ("llama", "transformers"): "flag", ("llama", "vllm"): "flag", ("llama", "sglang"): "flag",
    ("qwen3", "transformers"): "flag", ("qwen3", "vllm"): "refused", ("qwen3", "sglang"): "flag",
    ("gemma", "transformers"): "flag", ("gemma", "vllm"): "flag", ("gemma", "sglang"): "refused",
    ("granite", "transformers"): "flag", ("granite", "vllm"): "flag", ("granite", "sglang"): "refused",
    ("mistral", "transformers"): "relabel", ("mistral", "vllm"): "relabel", ("mistral", "sglang"): "relabel",
    ("qwen2", "transformers"): "relabel", ("qwen2", "vllm"): "relabel", ("qwen2", "sglang"): "relabel",
    ("mixtral", "transformers"): "refused", ("mixtral", "vllm"): "refused", ("mixtral", "sglang"): "refused",
    ("qwen2_moe", "transformers"): "refused", ("qwen2_moe", "vllm"): "refused",
    ("phi3", "transformers"): "refused",
}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def patched(model, scale=True):
    handle = lofit_fast.patch_model(model, HEADS, scale=scale, offset=True, backend="torch")
    handle.lofit.initialize(0.5, seed=1)
    return handle


@pytest.fixture(scope="module")
def merged_and_reloaded(tmp_path_factory):
    """For each case that merges: the patched model's logits, the merged model, and its checkpoint's logits in a
    fresh transformers process."""
    root = tmp_path_factory.mktemp("serving")
    outcomes, cases = {}, {}
    for (model_type, engine), expected in EXPECTED.items():
        if expected == "refused":
            continue
        handle = patched(tiny_model(model_type))
        want = logits(handle.model)
        with pytest.warns(UserWarning, match="LlamaForCausalLM") if expected == "relabel" else no_warnings():
            merged = handle.merge_and_unload(engine=engine)
        name = f"{model_type}-{engine}"
        merged.save_pretrained(root / name)
        outcomes[name] = (want, merged)
        cases[name] = {"model": str(root / name), "adapter": None, "quantization": None}
    results = run_in_fresh_process({"input_ids": IDS.tolist(), "max_new_tokens": 1, "cases": cases}, root)
    return outcomes, results


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("model_type, engine", [key for key, value in EXPECTED.items() if value != "refused"])
def test_the_merged_checkpoint_keeps_the_offsets(merged_and_reloaded, model_type, engine):
    outcomes, results = merged_and_reloaded
    name = f"{model_type}-{engine}"
    want, merged = outcomes[name]
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[name]["logits"], want, atol=1e-5, rtol=0)
    if EXPECTED[(model_type, engine)] == "relabel":
        assert isinstance(merged, LlamaForCausalLM) and merged.config.model_type == "llama"
        assert merged.config.attention_bias is True and getattr(merged.config, "sliding_window", None) is None
        assert merged.config.architectures == ["LlamaForCausalLM"]
    else:
        assert merged.config.model_type == model_type and merged.config.attention_bias is True
    attention = merged.model.layers[0].self_attn
    assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("model_type, engine", [key for key, value in EXPECTED.items() if value == "refused"])
def test_a_merge_that_would_lose_the_offsets_is_refused_and_changes_nothing(model_type, engine):
    model = tiny_model(model_type)
    handle = patched(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    want = logits(model)
    with pytest.raises(ValueError, match=f"cannot merge the offsets for {engine}: .*Ship the adapter unmerged"):
        handle.merge_and_unload(engine=engine)
    assert hasattr(model, "lofit") and handle.lofit is not None
    assert {name: p for name, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(logits(model), want)


def test_mistral_with_a_sliding_window_is_refused_for_transformers_and_flagged_for_vllm():
    """A sliding window inside the context: Llama would compute something else, so no relabel. vLLM's Mistral
    reads Llama's flag, so the flag serves there, with a warning that transformers would drop the biases."""
    handle = patched(tiny_model("mistral", sliding_window=4))
    with pytest.raises(ValueError, match="sliding window \\(4 tokens\\) applies"):
        handle.merge_and_unload(engine="transformers")
    want = logits(handle.model)
    with pytest.warns(UserWarning, match="transformers does not"):
        merged = handle.merge_and_unload(engine="vllm")
    assert merged.config.model_type == "mistral" and merged.config.attention_bias is True
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)


def test_scales_alone_merge_for_every_engine():
    """Without offsets there is no bias to keep: the scales fold into the weight, which every engine loads."""
    for engine in ("transformers", "vllm", "sglang"):
        model = tiny_model("qwen2_moe")
        handle = lofit_fast.patch_model(model, HEADS, scale=True, offset=False, backend="torch")
        with torch.no_grad():
            handle.scale.normal_()
        want = logits(model)
        merged = handle.merge_and_unload(engine=engine)
        assert merged is model and getattr(model.config, "attention_bias", False) is not True
        torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)


def test_an_unknown_engine_is_refused():
    handle = patched(tiny_model("llama"))
    with pytest.raises(ValueError, match="engine='tgi' is not one of"):
        handle.merge_and_unload(engine="tgi")
    assert handle.lofit is not None


def test_the_command_line_refuses_with_the_reason(tmp_path, capsys):
    model, _ = save_tiny_model_and_tokenizer(tmp_path / "model", model_type="qwen3")
    handle = patched(model)
    handle.save_pretrained(tmp_path / "adapter")
    arguments = ["merge", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--output-dir"]
    assert main([*arguments, str(tmp_path / "for_vllm"), "--for", "vllm"]) == 2
    assert "vllm builds qwen3's o_proj without a bias" in capsys.readouterr().err
    assert not (tmp_path / "for_vllm").exists()
    assert main([*arguments, str(tmp_path / "for_sglang"), "--for", "sglang"]) == 0
    assert "merged model for sglang" in capsys.readouterr().out
