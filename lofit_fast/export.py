"""Export a LoFiT adapter as a standard PEFT LoRA adapter, for tools that read PEFT's format.

    handle.export_peft_lora("adapter-lora/")          # or LofitModel.export_peft_lora, `lofit export`
    model = PeftModel.from_pretrained(base, "adapter-lora/")   # stock PEFT: lofit_fast is not needed

LoFiT on a layer is a LoRA of its o_proj. With W o_proj's weight, `cols` the input features of the layer's
selected heads, `a` / `v` their scales / offsets (flattened):

    o_proj(z') = W z + W[:, cols] diag(a) z[cols] + W[:, cols] v + b

so lora_A picks the features `cols` (one-hot rows), lora_B = W[:, cols] diag(a), and the offsets are
lora_B's bias (PEFT's `lora_bias=True`) W[:, cols] v. lora_alpha equals each layer's rank, so PEFT's scaling
is 1. Only the features with a non-zero scale get a rank; a layer without one (offsets only) gets rank 1 with
zero lora_A / lora_B. The tensors are fp32; W is the weight the layer multiplies by (dequantized for a
bitsandbytes 4-bit or 8-bit o_proj, exact for 4-bit).
"""

import os
from typing import Optional

import torch
from torch import nn

from .bnb import weight_columns
from .io import check_finite, write_config_and_weights
from .merge import check_weight_readable
from .version import __version__

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def _lora_of_layer(o_proj: nn.Module, columns: torch.Tensor, scale: Optional[torch.Tensor],
                   offset: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """lora_A.weight, lora_B.weight (and lora_B.bias with offsets) of one layer, fp32 on the CPU."""
    selected = weight_columns(o_proj, columns)  # W[:, cols], fp32
    scaled = scale.nonzero().flatten() if scale is not None else columns.new_zeros(0)
    rank = max(1, scaled.numel())
    lora_a = torch.zeros(rank, o_proj.in_features, device=columns.device)
    lora_b = torch.zeros(o_proj.out_features, rank, device=columns.device)
    if scaled.numel():
        lora_a[torch.arange(scaled.numel(), device=columns.device), columns[scaled]] = 1.0
        lora_b[:, :scaled.numel()] = selected[:, scaled] * scale[scaled]
    tensors = {"lora_A.weight": lora_a, "lora_B.weight": lora_b}
    if offset is not None:
        tensors["lora_B.bias"] = selected @ offset
    return {name: tensor.cpu().contiguous() for name, tensor in tensors.items()}


def lora_of_layer(name: str, o_proj: nn.Module, columns: torch.Tensor, scale: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PEFT LoRA tensors, keyed as PEFT saves them, of the layer whose o_proj is the module `name` of the
    causal LM, with the adapter's (K, head_dim) `scale` / `offset` rows on the input features `columns`."""
    check_weight_readable(o_proj, name, "export a LoRA of")
    lora = _lora_of_layer(o_proj, columns, scale.reshape(-1).float() if scale is not None else None,
                          offset.reshape(-1).float() if offset is not None else None)
    return {f"base_model.model.{name}.{key}": value for key, value in lora.items()}


def peft_lora_config(tensors: dict[str, torch.Tensor], base_model_name_or_path: Optional[str]) -> dict:
    """The adapter_config.json of the LoRA adapter made of `tensors` (from `lora_of_layer`): each layer's rank as
    its lora_A has it, lora_alpha equal to it, lora_bias when the layers have biases. ImportError without peft
    (its LoraConfig writes the config the installed PEFT reads)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("exporting to PEFT's LoRA format needs peft: pip install peft") from None
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    ranks = {key[len(prefix):-len(suffix)]: tensor.shape[0] for key, tensor in tensors.items() if key.endswith(suffix)}
    rank = max(ranks.values())
    # lora_alpha = rank for every layer (alpha_pattern follows rank_pattern): PEFT's scaling alpha / r is 1.
    pattern = {name: layer_rank for name, layer_rank in ranks.items() if layer_rank != rank}
    config = LoraConfig(
        r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=list(ranks),
        lora_dropout=0.0, bias="none", lora_bias=any(key.endswith("lora_B.bias") for key in tensors),
        use_rslora=False, task_type="CAUSAL_LM", inference_mode=True, base_model_name_or_path=base_model_name_or_path,
    ).to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def write_peft_lora(directory, tensors: dict[str, torch.Tensor], base_model_name_or_path: Optional[str]) -> None:
    """Write a PEFT LoRA adapter (adapter_config.json and adapter_model.safetensors, atomically) of `tensors`."""
    config = peft_lora_config(tensors, base_model_name_or_path)
    check_finite(tensors, "the adapter holds", "; there is nothing sound to export")
    write_config_and_weights(os.fspath(directory), PEFT_CONFIG_NAME, config, PEFT_WEIGHTS_NAME, tensors,
                             metadata={"format": "pt", "exported_by": f"lofit_fast {__version__}"})
