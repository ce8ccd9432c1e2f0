"""Merging an adapter into the weights it acts on: `merge_and_unload`.

Each patched layer's o_proj takes its adapter (W: weight, b: bias, v_hat / A_hat: the offsets / scales, zero
outside the selected heads):

    o_proj(diag(1 + A_hat) z + v_hat) = (W diag(1 + A_hat)) z + (b + W[:, sel] @ v_sel)

so the selected columns of W are multiplied by 1 + A and W[:, sel] @ v (with the unscaled W) is added to the
bias, in fp32, then cast to the layer's dtype. `plan_layer` checks one layer, `fold_layer` changes it; the
model-level call checks every layer and the serving engine (`lofit_fast.serving`) first, then folds.
"""

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .bnb import quantization_of, weight_columns
from .patch import LofitHandle, find_o_projs, first_parameter_device, head_columns
from .serving import (ENGINES, O_PROJ_BIAS_FROM_FLAG, add_zero_biases, attention_projections,
                      check_transformers_builds_biases, llama_config_of, plan_biases, relabelled_as_llama)


@dataclass
class LayerFold:
    """What merging changes in one layer's o_proj."""

    o_proj: nn.Module
    quantization: Optional[str]  # "4bit" / "8bit" for bitsandbytes weights
    columns: torch.Tensor  # the input features of the selected heads
    scale: Optional[torch.Tensor]  # (len(columns),) fp32, None when absent or all zero
    offset: Optional[torch.Tensor]  # (len(columns),) fp32, None when absent or all zero


def plan_layer(o_proj: nn.Module, layer: int, head_index: torch.Tensor, scale: Optional[torch.Tensor],
               offset: Optional[torch.Tensor], head_dim: int) -> LayerFold:
    """The fold of one layer's adapter (its (K, head_dim) scale / offset rows), checked; ValueError if it
    cannot be done."""
    check_weight_readable(o_proj, f"layer {layer}", "merge into")
    quantization = quantization_of(o_proj)
    scale = scale.reshape(-1).float() if scale is not None and bool(scale.any()) else None
    offset = offset.reshape(-1).float() if offset is not None and bool(offset.any()) else None
    if quantization and scale is not None:
        raise ValueError(f"layer {layer}: the adapter has non-zero scales, and o_proj holds {quantization} "
                         f"bitsandbytes weights, which cannot be rescaled column by column without quantizing "
                         f"again. Merge into an unquantized copy of the base model, or keep the adapter unmerged "
                         f"(load_adapter)")
    return LayerFold(o_proj, quantization, head_columns(head_index, head_dim), scale, offset)


def check_weight_readable(o_proj: nn.Module, where: str, action: str) -> None:
    """ValueError unless `o_proj` is a linear layer whose weight can be read here (a plain floating-point one,
    or bitsandbytes 4-bit / 8-bit), as merging and exporting need; `action` says which ("merge into")."""
    if not isinstance(o_proj, nn.Linear) or (quantization_of(o_proj) is None and not o_proj.weight.is_floating_point()):
        raise ValueError(f"{where}: cannot {action} an o_proj of type {type(o_proj).__name__}: it needs a "
                         f"torch.nn.Linear or a bitsandbytes Linear4bit / Linear8bitLt. Keep the adapter as it is "
                         f"(load_adapter) instead")
    if o_proj.weight.device.type == "meta":
        raise ValueError(f"{where}: o_proj's weight is on the meta device (offloaded?); load the model fully onto a "
                         f"device first")


def fold_layer(fold: LayerFold, bias_dtype: torch.dtype) -> Optional[nn.Parameter]:
    """Fold one layer (under no_grad); returns the bias parameter if one had to be created."""
    o_proj, created = fold.o_proj, None
    columns = weight_columns(o_proj, fold.columns)  # unscaled W[:, sel], fp32
    if fold.offset is not None:
        shift = columns @ fold.offset
        if o_proj.bias is None:
            dtype = o_proj.weight.dtype if o_proj.weight.is_floating_point() else bias_dtype
            created = nn.Parameter(shift.to(dtype), requires_grad=False)
            o_proj.bias = created
        else:
            o_proj.bias.copy_((o_proj.bias.float() + shift.to(o_proj.bias.device)).to(o_proj.bias.dtype))
    if fold.scale is not None:  # plain weights only (checked in plan_layer)
        o_proj.weight.index_copy_(1, fold.columns, (columns * (1 + fold.scale)).to(o_proj.weight.dtype))
    return created


def bias_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a new bias beside a quantized weight: the model's first floating parameter's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def merge_and_unload(handle: LofitHandle, engine: str = "transformers") -> nn.Module:
    """Fold the adapter into o_proj, remove LoFiT, and return the plain model.

    Plain weights: the selected columns of W are multiplied by 1 + A, and W[:, sel] @ v is added to o_proj's bias
    (created where o_proj has none; it follows the weight's requires_grad flag). All in fp32, cast to the weight's
    dtype.

    bitsandbytes o_proj: offsets go into the bias, computed from the dequantized weight; the quantized weight is
    not touched. For 4-bit this equals the patched model (it dequantizes, then multiplies). LLM.int8 at inference
    quantizes its input row by row, so the merged int8 model computes W Q(z) + W v where the patched one computes
    W Q(z + v): a slightly different, equally valid LoFiT on an int8 base. Non-zero scales on a quantized o_proj
    are refused (ValueError) rather than quantizing the weight again.

    Args:
        handle: the adapter (`patch_model`, `load_adapter`).
        engine: where the saved merged model will run, "transformers", "vllm" or "sglang". Its offsets live in
            o_proj biases, which a checkpoint keeps only where that engine builds them (`lofit_fast.serving`):
            where it reads `config.attention_bias`, the flag is set and the other attention projections get zero
            biases; Mistral and Qwen2 without a sliding window come back as a LlamaForCausalLM holding the same
            weights (a new model object); elsewhere ValueError naming the reason and the alternatives.
    Nothing is changed when a check fails.
    """
    if handle.lofit is None:
        raise RuntimeError("this LoFiT handle was already removed")
    model = handle.model
    o_projs = find_o_projs(model, handle.target_module)
    with torch.no_grad():
        folds = [plan_layer(o_projs[layer], layer,
                            *handle.lofit.layer_tensors(layer, first_parameter_device(o_projs[layer])), handle.head_dim)
                 for layer in handle.lofit.layers]
    bias_plan, missing_biases, llama_config = None, [], None
    if any(fold.offset is not None for fold in folds):
        bias_plan = plan_biases(model, engine)
        missing_biases = [layer for layer in (*o_projs, *attention_projections(model, o_projs)) if layer.bias is None]
        if bias_plan.how == "flag" and (engine == "transformers"
                                        or model.config.model_type in O_PROJ_BIAS_FROM_FLAG["transformers"]):
            check_transformers_builds_biases(model, missing_biases)
        if bias_plan.how == "relabel":
            llama_config = llama_config_of(model)
    elif engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    with torch.no_grad():
        created = [fold_layer(fold, bias_dtype(model)) for fold in folds]
    handle.remove()
    for fold, bias in zip(folds, created):
        if bias is not None:
            bias.requires_grad_(fold.o_proj.weight.requires_grad)
    if bias_plan is not None:
        add_zero_biases(missing_biases, bias_dtype(model))
        if bias_plan.how == "flag":
            model.config.attention_bias = True
        else:
            model = relabelled_as_llama(model, llama_config)
        if bias_plan.note:
            warnings.warn(f"merge_and_unload(engine={engine!r}): {bias_plan.note}", stacklevel=3)
    return model
