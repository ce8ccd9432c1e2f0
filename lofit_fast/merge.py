"""Merging an adapter into the weights it acts on, layer by layer (`LofitHandle.merge_and_unload` loops over them).

Each patched layer's o_proj takes its adapter (W: weight, b: bias, v_hat / A_hat: the offsets / scales, zero
outside the selected heads):

    o_proj(diag(1 + A_hat) z + v_hat) = (W diag(1 + A_hat)) z + (b + W[:, sel] @ v_sel)

so the selected columns of W are multiplied by 1 + A and W[:, sel] @ v (with the unscaled W) is added to the
bias, in fp32, then cast to the layer's dtype. `plan_layer` checks one layer, `fold_layer` changes it; the
model-level call checks every layer and the serving engine (`lofit_fast.serving`) first, then folds.

bitsandbytes o_proj: offsets go into the bias, computed from the dequantized weight; the quantized weight is not
touched. For 4-bit this equals the patched model (it dequantizes, then multiplies). LLM.int8 at inference
quantizes its input row by row, so the merged int8 model computes W Q(z) + W v where the patched one computes
W Q(z + v): a slightly different, equally valid LoFiT on an int8 base. Non-zero scales on a quantized o_proj are
refused rather than quantizing the weight again.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .bnb import quantization_of, weight_columns


@dataclass
class LayerFold:
    """What merging changes in one layer's o_proj."""

    o_proj: nn.Module
    columns: torch.Tensor  # the input features of the selected heads
    scale: Optional[torch.Tensor]  # (len(columns),) fp32, None when absent or all zero
    offset: Optional[torch.Tensor]  # (len(columns),) fp32, None when absent or all zero


def plan_layer(o_proj: nn.Module, layer: int, columns: torch.Tensor, scale: Optional[torch.Tensor],
               offset: Optional[torch.Tensor]) -> LayerFold:
    """The fold of one layer's adapter (its (K, head_dim) scale / offset rows on the input features `columns`),
    checked; ValueError if it cannot be done."""
    check_weight_readable(o_proj, f"layer {layer}", "merge into")
    quantization = quantization_of(o_proj)
    scale = scale.reshape(-1).float() if scale is not None and bool(scale.any()) else None
    offset = offset.reshape(-1).float() if offset is not None and bool(offset.any()) else None
    if quantization and scale is not None:
        raise ValueError(f"layer {layer}: the adapter has non-zero scales, and o_proj holds {quantization} "
                         f"bitsandbytes weights, which cannot be rescaled column by column without quantizing "
                         f"again. Merge into an unquantized copy of the base model, or keep the adapter unmerged "
                         f"(load_adapter)")
    return LayerFold(o_proj, columns, scale, offset)


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


def fold_layer(fold: LayerFold, quantized_bias_dtype: torch.dtype) -> Optional[nn.Parameter]:
    """Fold one layer (under no_grad); returns the bias parameter if one had to be created."""
    o_proj, created = fold.o_proj, None
    columns = weight_columns(o_proj, fold.columns)  # unscaled W[:, sel], fp32
    if fold.offset is not None:
        shift = columns @ fold.offset
        if o_proj.bias is None:
            created = nn.Parameter(shift.to(new_bias_dtype(o_proj, quantized_bias_dtype)), requires_grad=False)
            o_proj.bias = created
        else:
            o_proj.bias.copy_((o_proj.bias.float() + shift.to(o_proj.bias.device)).to(o_proj.bias.dtype))
    if fold.scale is not None:  # plain weights only (checked in plan_layer)
        o_proj.weight.index_copy_(1, fold.columns, (columns * (1 + fold.scale)).to(o_proj.weight.dtype))
    return created


def bias_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a new bias beside a quantized weight: the model's first floating parameter's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def new_bias_dtype(layer: nn.Module, quantized_bias_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a bias added to `layer`: its weight's, or `quantized_bias_dtype` (`bias_dtype(model)`) beside a
    quantized weight."""
    return layer.weight.dtype if layer.weight.is_floating_point() else quantized_bias_dtype
