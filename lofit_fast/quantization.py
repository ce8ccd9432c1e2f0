"""bitsandbytes bases: what LoFiT needs to train on an 8-bit or 4-bit model, and nothing more.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    prepare_kbit_training(model, gradient_checkpointing=True)
    handle = lofit_fast.patch_model(model, heads, scale=False)

`patch_model` works on a bitsandbytes model as it is: LoFiT only reads o_proj's input (scales) or adds
to its output (offsets), and bitsandbytes' Linear4bit / Linear8bitLt pass gradients to their input.
`prepare_kbit_training` does the three things that training on such a model still needs: it freezes the base,
keeps the 4-bit layers off bitsandbytes' CPU kernel that has no backward, and turns on non-reentrant gradient
checkpointing that still stops backward at the lowest selected layer. It does not upcast the base to fp32 as
PEFT does: measured, it costs 55-59% more saved activations and removes about 1% of the 16-bit error of
LoFiT's gradients (benchmarks/README.md).
`quantization_info` says how a model is quantized.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .bnb import (
    bitsandbytes_module,
    is_repacked,
    keep_unpacked,
    linear4bit_layers,
    quantized_linears,
    repacking_error,
)
from .patch import LofitParameters

# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizationInfo:
    """How the linear layers of a bitsandbytes model are quantized."""

    method: str  # "int8" (LLM.int8), "nf4" or "fp4"
    double_quant: bool  # 4-bit: the block scales are quantized too (bnb_4bit_use_double_quant)
    compute_dtype: Optional[torch.dtype]  # 4-bit: the dtype the dequantized matmul runs in
    num_layers: int  # quantized linear layers

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4


def quantization_info(model: nn.Module) -> Optional[QuantizationInfo]:
    """How `model` is quantized by bitsandbytes, or None when it has no quantized linear layer.
    ValueError if it mixes methods (LoFiT itself would not mind; the report would be wrong).

    Args:
        model: any nn.Module; its bitsandbytes Linear8bitLt / Linear4bit layers are inspected.
    """
    layers = quantized_linears(model)
    if not layers:
        return None
    kinds = {_layer_kind(layer) for layer in layers}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes bitsandbytes quantizations {sorted(map(str, kinds))}")
    method, double_quant, compute_dtype = kinds.pop()
    return QuantizationInfo(method=method, double_quant=double_quant, compute_dtype=compute_dtype,
                            num_layers=len(layers))


def _layer_kind(layer: nn.Module) -> tuple:
    bnb = bitsandbytes_module()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8", False, None
    quant_state = layer.weight.quant_state
    if quant_state is not None:
        quant_type = quant_state.quant_type
        nested = bool(getattr(quant_state, "original_nested", quant_state.nested))
    else:  # not quantized yet (still on the meta device or the host)
        quant_type = layer.weight.quant_type
        nested = bool(layer.weight.compress_statistics)
    return quant_type, nested, layer.compute_dtype


# ----------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------

def prepare_kbit_training(model: nn.Module, gradient_checkpointing: bool = False,
                          gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """Get a (bitsandbytes or plain) Hugging Face model ready for LoFiT training; returns it.

    Freezes every parameter but LoFiT's (`model.lofit`, also inside a LofitModel or a PEFT model, or the
    `load_adapters` bank; so it can be called before or after `patch_model`), keeps bitsandbytes' 4-bit layers
    on differentiable kernels (`keep_4bit_layers_differentiable`: call this before any eval-mode pass), and with
    `gradient_checkpointing=True` turns on non-reentrant checkpointing without the embedding hook that would make
    backward run through every layer (`enable_gradient_checkpointing`).
    Weights keep their dtype: unlike PEFT's `prepare_model_for_kbit_training` nothing is upcast to fp32
    (measured in benchmarks/README.md: it costs memory and does not make LoFiT's gradients more accurate).

    Args:
        model: a Hugging Face causal LM, quantized by bitsandbytes or not, patched by LoFiT already or not.
        gradient_checkpointing: turn on non-reentrant activation checkpointing of every decoder layer.
        gradient_checkpointing_kwargs: passed on to Transformers and `torch.utils.checkpoint` (see
            `enable_gradient_checkpointing`); `use_reentrant=True` is refused.
    """
    # By module, not by name: inside a LofitModel, a PEFT model or a bank of load_adapters, LoFiT's parameters
    # are "wrapped_model.lofit.offset", "base_model.model.lofit.scale", "lofit_adapters.<name>.offset".
    lofit = {id(p) for module in model.modules() if isinstance(module, LofitParameters) for p in module.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in lofit:
            parameter.requires_grad_(False)
    keep_4bit_layers_differentiable(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, gradient_checkpointing_kwargs)
    return model


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel, which has no backward
    (autograd would only warn, and gradients through those layers would be wrong). ValueError if a layer
    is repacked already: bitsandbytes' own unpacking does not give the original weight back.

    On CPUs with AVX512-BF16, Linear4bit repacks its weight for a gemv kernel the first time it runs in eval mode
    without grad (a DPO reference pass, an evaluation), and from then on multiplies with that kernel; so call
    this before any eval-mode pass."""
    layers = linear4bit_layers(model)
    repacked = [name or type(layer).__name__ for name, layer in layers if is_repacked(layer)]
    if repacked:
        raise ValueError(repacking_error(repacked, "Load the model again and call "
                                                   "lofit_fast.prepare_kbit_training(model) before running it in "
                                                   "eval mode"))
    for _, layer in layers:
        keep_unpacked(layer)


def enable_gradient_checkpointing(model: nn.Module, kwargs: Optional[dict] = None) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, with the embeddings' output left
    as it is (not requiring grad), so backward stops at the lowest layer with trainable LoFiT heads.

    Transformers' `gradient_checkpointing_enable` (and so Trainer's `gradient_checkpointing=True`) adds a hook
    that makes the embeddings' output require grad, because reentrant checkpointing and PEFT need it; then every
    layer's output requires grad and backward runs, and recomputes, every layer down to the embeddings. That hook
    is removed here: non-reentrant checkpointing needs no input gradient, as the LoFiT parameters inside a
    checkpointed layer make its output require grad (tests/test_quantized.py counts the recomputed layers).

    `kwargs` go to Transformers' `activation_checkpointing_enable` (`gradient_checkpointing_enable` in
    older versions) and on to `torch.utils.checkpoint`; `use_reentrant=True` is refused: reentrant
    checkpointing gives parameters inside a layer no gradient unless the layer's input requires grad.
    """
    kwargs = dict(kwargs or {})
    if kwargs.get("use_reentrant", False):
        raise ValueError("LoFiT uses non-reentrant gradient checkpointing (use_reentrant=False): reentrant "
                         "checkpointing needs the embeddings' output to require grad, which makes backward run "
                         "through every layer, not only those above the lowest selected head")
    kwargs["use_reentrant"] = False
    if hasattr(model, "activation_checkpointing_enable"):  # Transformers 5
        layer_options = {key: kwargs.pop(key) for key in ("every_n_layers", "offload") if key in kwargs}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **layer_options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing (not a Transformers model?)")
    disable_input_require_grads(model)


def disable_input_require_grads(model: nn.Module) -> None:
    """Remove the hooks of Transformers' `enable_input_require_grads`, if any are attached."""
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
