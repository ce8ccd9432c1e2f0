"""Which serving engines keep a merged model's offsets, and how a merge makes sure they do.

Merging folds LoFiT's offsets into new `o_proj` biases (`LofitHandle.merge_and_unload`). A saved
checkpoint keeps them only where the engine that loads it builds `o_proj` with a bias; where it does not,
the engine drops the tensor without an error (vLLM logs it at DEBUG level, SGLang not at all, transformers in
its load report). So `merge_and_unload(engine=...)` first decides, before changing anything, how the named
engine will keep them, and refuses when it cannot:

- "flag": the engine builds o_proj's bias from `config.attention_bias` (and with it q/k/v biases, which the
  merge adds as zeros);
- "relabel": Mistral and Qwen2 compute exactly what Llama computes with `attention_bias=True` (zero q/k/v
  biases for Mistral; Qwen2's own) when no sliding window applies, and every engine honours Llama's flag: the
  merged model becomes a LlamaForCausalLM with the same weights.

The rules below were read from the engines' sources (vLLM 0.34.0, SGLang 0.5.23, transformers 5.24), not run
here, except transformers', which the merge also checks by building the model from the new config.
"""

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .merge import new_bias_dtype

ENGINES = ("transformers", "vllm", "sglang")

# model_type -> whether the engine builds o_proj's bias from `attention_bias`, read in:
# transformers 5.24, models/<type>/modeling_<type>.py: q/k/v/o `bias=config.attention_bias` in llama, qwen3,
#   qwen3_moe, gemma, gemma2, gemma3 (text), olmo, olmo2, granite; hard-coded bias=False on o_proj in mistral,
#   mixtral, qwen2, qwen2_moe, phi3.
# vLLM 0.34.0, model_executor/models/: llama.py:268-274 (`attention_bias or bias`, o_proj bias_o_proj);
#   mistral.py:236 and phi3.py:10 subclass LlamaForCausalLM; gemma, olmo, olmo2 run through the Transformers
#   backend (registry.py:787-798; transformers/utils.py:139-142 keeps each HF Linear's bias); gemma2.py:143,
#   gemma3.py:144, granite.py:264-266 read the flag; mixtral.py:192, qwen2.py:169, qwen2_moe.py:246 and
#   qwen3.py:118 / qwen3_moe.py:297 build o_proj with bias=False (the qwen3 flag gives q/k/v only);
#   utils.py:468-469 drops unexpected ".bias" tensors with a DEBUG log.
# SGLang 0.5.23, srt/models/: llama.py:339-341 (`attention_bias or bias`), mistral.py:33 and llama.py:956 map
#   Mistral and Phi-3 to Llama; qwen3.py:209, qwen3_moe.py:539, gemma2.py:146, gemma3_causal.py:180, olmo.py:108,
#   olmo2.py:161 read the flag; gemma.py:125, granite.py:179, mixtral.py:169, qwen2.py:201, qwen2_moe.py:947 are
#   bias=False; every loader skips a ".bias" it has no parameter for (e.g. llama.py:766-768), silently.
O_PROJ_BIAS_FROM_FLAG = {
    "transformers": frozenset({"llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                               "granite"}),
    "vllm": frozenset({"llama", "mistral", "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite"}),
    "sglang": frozenset({"llama", "mistral", "phi3", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "olmo",
                         "olmo2"}),
}
# The model types the rules above were read for.
RULED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                               "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "phi3"})
# Architectures whose weights a Llama reads as they are (same module names and functions but for the biases and
# the sliding window): transformers' modeling_mistral.py / modeling_qwen2.py against modeling_llama.py.
RELABELS_AS_LLAMA = ("mistral", "qwen2")
# Keys of the source config that a Llama config must not carry (vLLM applies any `sliding_window` it finds, and a
# `qkv_bias` key overrides Llama's q/k/v biases there).
_NOT_LLAMA_KEYS = ("model_type", "architectures", "sliding_window", "use_sliding_window", "max_window_layers",
                   "layer_types", "qkv_bias", "auto_map")


@dataclass(frozen=True)
class BiasPlan:
    """How a merged model keeps its o_proj biases in `engine`: "flag" or "relabel" (see the module doc)."""

    engine: str
    how: str
    note: Optional[str] = None  # what the user should know (e.g. that another engine would drop the biases)
    # Whether transformers builds these biases from the flag too, so that building the model checks the plan.
    check_transformers: bool = False


def relabel_obstacle(config) -> Optional[str]:
    """Why `config` (a Mistral or Qwen2 config) does not compute what Llama computes, or None when it does."""
    if config.model_type not in RELABELS_AS_LLAMA:
        return f"{config.model_type} is not one of the architectures that Llama reads as they are {RELABELS_AS_LLAMA}"
    if getattr(config, "mlp_bias", False):
        return "it has MLP biases"
    if config.hidden_size % config.num_attention_heads:
        return "Llama requires hidden_size to be a multiple of num_attention_heads"
    if config.model_type == "mistral":
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            return (f"its sliding window ({window} tokens) applies within max_position_embeddings "
                    f"({config.max_position_embeddings}), and Llama has none")
    else:
        sliding = [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind != "full_attention"]
        if sliding:
            return f"layers {sliding} use sliding-window attention, and Llama has none"
    return None


def plan_biases(model: nn.Module, engine: str) -> BiasPlan:
    """How `model`, once merged with offsets, keeps its o_proj biases in `engine`; ValueError naming the reason
    and the alternatives when it cannot. `engine` is one of ENGINES (the caller checks)."""
    model_type = model.config.model_type
    if model_type not in RULED_MODEL_TYPES:
        if engine == "transformers" and getattr(model.config, "attention_bias", None) is not None:
            return BiasPlan(engine, "flag", check_transformers=True)  # check_transformers_builds_biases
        raise ValueError(f"no rule is written down for how {engine} builds {model_type}'s o_proj, so the merged "
                         f"offsets might be dropped: ship the adapter unmerged (load_adapter), or export it with "
                         f"export_peft_lora")
    in_engine = model_type in O_PROJ_BIAS_FROM_FLAG[engine]
    if in_engine and model_type in O_PROJ_BIAS_FROM_FLAG["transformers"]:
        return BiasPlan(engine, "flag", check_transformers=True)
    obstacle = relabel_obstacle(model.config)
    quantized = getattr(model, "is_quantized", False)
    if obstacle is None and not quantized:
        return BiasPlan(engine, "relabel", note=f"{model_type} has no configurable o_proj bias in transformers: "
                                                  f"the merged model is a LlamaForCausalLM with the same weights")
    if in_engine:
        return BiasPlan(engine, "flag", note=f"{engine} builds {model_type}'s o_proj bias from attention_bias, but "
                                             f"transformers does not: loaded with transformers, this checkpoint "
                                             f"loses the offsets")
    reason = (f"{engine} builds {model_type}'s o_proj without a bias and drops the merged offsets when it loads the "
              f"checkpoint, without an error")
    relabel = ("a quantized base cannot be relabelled as Llama (merge into an unquantized copy)" if quantized
               and obstacle is None else f"it cannot be relabelled as Llama: {obstacle}")
    raise ValueError(f"cannot merge the offsets for {engine}: {reason}; {relabel}. Ship the adapter unmerged "
                     f"(load_adapter), or export it with export_peft_lora for PEFT-based tools, or merge an "
                     f"adapter without offsets (scales fold into the weight)")


def attention_projections(model: nn.Module, o_projs: list[nn.Module]) -> list[nn.Linear]:
    """The linear projections beside each o_proj in its attention module (q, k, v, or a fused qkv)."""
    parents = {id(child): module for module in model.modules() for child in module.children()}
    projections = []
    for o_proj in o_projs:
        projections += [child for child in parents[id(o_proj)].children()
                        if isinstance(child, nn.Linear) and child is not o_proj]
    return projections


def add_zero_biases(layers: list[nn.Linear], dtype: torch.dtype) -> None:
    """A zero bias on each layer that has none (`dtype` beside a quantized weight)."""
    for layer in layers:
        if layer.bias is None:
            zeros = torch.zeros(layer.out_features, dtype=new_bias_dtype(layer, dtype), device=layer.weight.device)
            layer.bias = nn.Parameter(zeros, requires_grad=layer.weight.requires_grad)


def check_transformers_builds_biases(model: nn.Module, layers: list[nn.Linear]) -> None:
    """ValueError unless transformers, given `attention_bias=True`, builds a bias on exactly `layers` beside the
    model's own parameters (so a saved merged model reloads with them)."""
    candidate = copy.deepcopy(model.config)
    candidate.attention_bias = True
    with torch.device("meta"):
        skeleton = type(model)(candidate)
    present = {name for name, _ in model.named_parameters()}
    added = {name for name, _ in skeleton.named_parameters()} - present
    names = {id(module): name for name, module in model.named_modules()}
    wanted = {f"{names[id(layer)]}.bias" for layer in layers}
    if added != wanted:
        raise ValueError(f"{type(model).__name__} with attention_bias=True adds the parameters {sorted(added)[:4]}, "
                         f"not the projection biases {sorted(wanted)[:4]}; keep the adapter unmerged (load_adapter)")


def llama_config_of(model: nn.Module):
    """The LlamaConfig (attention_bias=True) under which Llama computes what `model` (Mistral, Qwen2) computes."""
    from transformers import LlamaConfig

    values = {key: value for key, value in model.config.to_dict().items() if key not in _NOT_LLAMA_KEYS}
    return LlamaConfig(**{**values, "attention_bias": True, "mlp_bias": False, "architectures": ["LlamaForCausalLM"]})


def relabelled_as_llama(model: nn.Module, config) -> nn.Module:
    """A LlamaForCausalLM of `config` (from `llama_config_of`) holding `model`'s parameters and buffers (the same
    tensors, not copies); every attention projection of `model` must have its bias already."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    llama.load_state_dict(model.state_dict(), strict=True, assign=True)
    own = dict(model.named_buffers())
    for name, buffer in list(llama.named_buffers()):  # non-persistent ones (rotary inv_freq) are not in state_dict
        if buffer.is_meta:
            owner, _, attribute = name.rpartition(".")
            llama.get_submodule(owner).register_buffer(attribute, own[name], persistent=False)
    llama.generation_config = model.generation_config
    llama.train(model.training)
    return llama
