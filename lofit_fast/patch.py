"""`patch_model`: attach LoFiT to the `o_proj` of a Hugging Face causal LM.

A forward pre-hook on each layer's `o_proj` that holds a selected head replaces its input `z` with
`z'`, through `lofit_fast.ops.head_affine`. The LoFiT parameters live in one small module,
`model.lofit`, so they show in `named_parameters()`, move with `model.to()` and are the only
parameters left trainable. `handle.remove()` takes all of it away again.
"""

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .bnb import REPACKED_REMEDY, Repacking4bitHold, RepackingCheckHook, linear_response
from .export import lora_of_layer, write_peft_lora
from .merge import bias_dtype, fold_layer, plan_layer
from .ops import BACKENDS, head_affine, resolve_backend
from .serving import (
    ENGINES,
    add_zero_biases,
    attention_projections,
    check_transformers_builds_biases,
    llama_config_of,
    plan_biases,
    relabelled_as_llama,
)

LOFIT_MODULE_NAME = "lofit"  # model.lofit: patch_model's and load_adapter's parameters
ADAPTERS_MODULE_NAME = "lofit_adapters"  # model.lofit_adapters: load_adapters' bank of adapters


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a model keeps its decoder layers and, inside each layer, the attention output projection."""

    layers: str = "model.layers"
    o_proj: str = "self_attn.o_proj"


# model_type -> where to find o_proj. Each entry is tested on a tiny model of that type.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    model_type: ArchitectureSpec()
    for model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                       "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "phi3")
}


def register_architecture(model_type: str, layers: str = "model.layers", o_proj: str = "self_attn.o_proj"):
    """Teach `patch_model` a new architecture: `layers` is the dotted path from the model to its list
    of decoder layers, `o_proj` the dotted path from a layer to its attention output projection."""
    ARCHITECTURES[model_type] = ArchitectureSpec(layers=layers, o_proj=o_proj)


def architecture_spec(model: nn.Module) -> ArchitectureSpec:
    """Where `model` keeps its decoder layers and o_proj; ValueError naming the fix for an unknown architecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ValueError(
        f"lofit_fast does not know the architecture {model_type!r} "
        f"(supported: {', '.join(sorted(ARCHITECTURES))}). If its layers have an attention output "
        f"projection, point at it with lofit_fast.register_architecture({model_type!r}, "
        f"layers='model.layers', o_proj='self_attn.o_proj') using the dotted paths of your model.")


def decoder_layers(model: nn.Module) -> nn.Module:
    """The model's list of decoder layers (an nn.ModuleList), lowest first."""
    spec = architecture_spec(model)
    try:
        return model.get_submodule(spec.layers)
    except AttributeError as error:
        raise ValueError(f"could not find {spec.layers} in {type(model).__name__} ({error}); fix the path with "
                         f"lofit_fast.register_architecture({model.config.model_type!r}, layers=..., "
                         f"o_proj=...)") from None


def find_o_projs(model: nn.Module, target_module: Optional[str] = None) -> list[nn.Module]:
    """The attention output projection of every decoder layer, lowest layer first. `target_module` is the
    dotted path from a layer to the projection, when it is not the architecture's usual one."""
    spec = architecture_spec(model)
    o_proj_path = target_module or spec.o_proj
    layers = decoder_layers(model)
    try:
        return [layer.get_submodule(o_proj_path) for layer in layers]
    except AttributeError as error:
        hint = ("check target_module" if target_module else
                f"fix the paths with lofit_fast.register_architecture({model.config.model_type!r}, "
                f"layers=..., o_proj=...)")
        raise ValueError(f"could not find {spec.layers}[i].{o_proj_path} in {type(model).__name__} ({error}); "
                         f"{hint}") from None


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int  # query heads
    head_dim: int


def attention_shape(model: nn.Module, target_module: Optional[str] = None) -> AttentionShape:
    """Layers, query heads and head size. `head_dim` is not always hidden_size // heads (Gemma, Qwen3)."""
    o_projs = find_o_projs(model, target_module)
    config = model.config
    num_heads = config.num_attention_heads
    in_features = o_projs[0].in_features
    head_dim = getattr(config, "head_dim", None) or in_features // num_heads
    if num_heads * head_dim != in_features:
        raise ValueError(f"{type(model).__name__}: o_proj takes {in_features} features, which is not "
                         f"num_attention_heads ({num_heads}) x head_dim ({head_dim})")
    return AttentionShape(num_layers=len(o_projs), num_heads=num_heads, head_dim=head_dim)


def _validate_heads(heads, shape: AttentionShape) -> list[tuple[int, int]]:
    if heads is None:
        return [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise TypeError(f"heads must be None or an iterable of (layer, head) pairs, not {type(heads).__name__}")
    validated, seen = [], set()
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise TypeError(f"each entry of heads must be a (layer, head) pair of ints, got {item!r}") from None
        if not 0 <= layer < shape.num_layers:
            raise ValueError(f"head {item!r}: layer {layer} is out of range; the model has "
                             f"{shape.num_layers} layers (0..{shape.num_layers - 1})")
        if not 0 <= head < shape.num_heads:
            raise ValueError(f"head {item!r}: head {head} is out of range; each layer has "
                             f"{shape.num_heads} query heads (0..{shape.num_heads - 1})")
        if (layer, head) in seen:
            raise ValueError(f"head {(layer, head)} is listed twice; list each (layer, head) once")
        seen.add((layer, head))
        validated.append((layer, head))
    if not validated:
        raise ValueError("heads is empty; pass at least one (layer, head), or None for every head")
    return validated


class LofitParameters(nn.Module):
    """Holds the LoFiT parameters inside the model, plus per-layer index buffers for the hooks.

    Row i of `scale` / `offset` belongs to `heads[i]`. For layer l, `slots_{l}` lists the rows of that
    layer and `head_index_{l}` the heads they act on, in the same order. `enabled` switches the
    transform off without removing it.
    """

    def __init__(self, heads, head_dim, scale: bool, offset: bool, device):
        super().__init__()
        shape = (len(heads), head_dim)
        self.scale = nn.Parameter(torch.zeros(shape, device=device)) if scale else None
        self.offset = nn.Parameter(torch.zeros(shape, device=device)) if offset else None
        self.enabled = True
        self.handle_ref = None  # weakref.ref to the LofitHandle that owns this module (see `handle_of`)
        self.layers = sorted({layer for layer, _ in heads})
        for layer in self.layers:
            slots = [i for i, (at, _) in enumerate(heads) if at == layer]
            self.register_buffer(f"slots_{layer}", torch.tensor(slots, device=device), persistent=False)
            self.register_buffer(f"head_index_{layer}", torch.tensor([heads[i][1] for i in slots], device=device),
                                 persistent=False)

    def __getstate__(self):
        # A copy (deepcopy, pickle) belongs to no handle; a weakref could not be pickled anyway.
        return {**super().__getstate__(), "handle_ref": None}

    def _apply(self, fn, recurse=True):
        """`model.half()`, `model.to(torch.bfloat16)` and the like move LoFiT's parameters (device, memory
        format) but keep them fp32: they are the master weights, and 16 bits would round every update."""
        def keep_float32(tensor):
            moved = fn(tensor)
            if (tensor.dtype == torch.float32 and moved.is_floating_point()
                    and torch.finfo(moved.dtype).bits < 32):
                return tensor.to(device=moved.device)  # from the fp32 values, not from the rounded copy
            return moved

        return super()._apply(keep_float32, recurse)

    def initialize(self, std: float, seed: int) -> None:
        """Draw every parameter from Normal(0, std) (std 0: zeros, the base model itself) with a CPU generator
        seeded by `seed`, so that a seed gives the same start on any device and through every API (select_heads,
        tune, get_lofit_model)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for parameter in (self.scale, self.offset):
                if parameter is not None:
                    draw = torch.randn(parameter.shape, generator=generator) * std
                    parameter.copy_(draw.to(parameter.device) if std else torch.zeros_like(parameter))

    def layer_tensors(self, layer: int, device: torch.device):
        """(head_index, scale rows, offset rows) of one layer, on `device`."""
        slots = getattr(self, f"slots_{layer}")
        head_index = getattr(self, f"head_index_{layer}").to(device)
        scale = self.scale.index_select(0, slots).to(device) if self.scale is not None else None
        offset = self.offset.index_select(0, slots).to(device) if self.offset is not None else None
        return head_index, scale, offset


# The hooks are objects holding the LofitParameters module rather than closures over the handle: a
# `copy.deepcopy` of a patched model copies its hooks along with `model.lofit`, so the copy's hooks read
# the copy's parameters (closures would be shared, and the copy would silently use the original's).

class TransformHook:
    """Forward pre-hook on o_proj: replace its input z with z' (scales, and offsets in the same pass)."""

    def __init__(self, lofit: LofitParameters, layer: int, backend: str):
        self.lofit, self.layer, self.backend = lofit, layer, backend

    def __call__(self, module, args):
        if not self.lofit.enabled:
            return None
        z = args[0]
        head_index, scale, offset = self.lofit.layer_tensors(self.layer, z.device)
        # patch_model validated the heads once: no per-call check (a device sync on CUDA).
        return (head_affine(z, head_index, scale, offset, backend=self.backend, check_head_index=False), *args[1:])


class OffsetFoldHook:
    """Forward hook on a linear o_proj, offsets only: o_proj(z + v_hat) = o_proj(z) + (o_proj(v_hat) - o_proj(0)),
    so the offsets enter as one vector added to o_proj's output and no per-token work touches z. Backward gets
    dL/dv = W_sel^T sum_t dL/dy through the small shift computation, and dL/dz is unchanged."""

    def __init__(self, lofit: LofitParameters, layer: int, head_dim: int):
        self.lofit, self.layer, self.head_dim = lofit, layer, head_dim

    def __call__(self, module, args, output):
        if not self.lofit.enabled:
            return None
        z = args[0]
        head_index, _, offset = self.lofit.layer_tensors(self.layer, z.device)
        shift = folded_offset(module, head_index, offset, self.head_dim, z.dtype).to(output.dtype)
        return add_to_output(output, shift)


def add_to_output(output: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """output + shift, in place where autograd allows: o_proj's backward does not need its output, and a new
    tensor would cost a pass. Autograd refuses (before changing anything) when the output is a view made inside
    an autograd Function or without grad, as LLM.int8's reshaped result is: then out of place."""
    try:
        return output.add_(shift)
    except RuntimeError:
        return output + shift


def folds_offsets(o_proj: nn.Module) -> bool:
    """Whether offsets can be folded into o_proj's output: it must be an affine map of its input, which every
    torch.nn.Linear is (bitsandbytes' layers subclass it). Other modules (a PEFT LoRA wrapper with dropout, ...)
    get the offsets through the pre-hook on their input instead."""
    return isinstance(o_proj, nn.Linear)


def hold_4bit_repacking(model: nn.Module, lowest_layer: int, parameters: nn.Module, trainable: bool):
    """Keep the model's bitsandbytes 4-bit layers off bitsandbytes' repacking path while `parameters` can train
    (see `lofit_fast.bnb`). Returns (the hold, its check hook for `lowest_layer`'s o_proj, or None when the
    model has no 4-bit layer). ValueError, before anything changes, when `trainable` and a layer that backward
    passes through (from `lowest_layer`'s o_proj up) is repacked already."""
    layers = decoder_layers(model)
    # Backward needs neither the layers below the lowest one nor, in that layer, the attention's projections
    # that run before o_proj (q, k, v): their inputs need no grad, and bitsandbytes' kernel may have them.
    attention_path, _, o_proj_name = architecture_spec(model).o_proj.rpartition(".")
    before_o_proj = ()
    if attention_path:
        attention = layers[lowest_layer].get_submodule(attention_path)
        before_o_proj = tuple(child for name, child in attention.named_children() if name != o_proj_name)
    hold = Repacking4bitHold(model, off_path=(*layers[:lowest_layer], *before_o_proj))
    if not hold:
        return hold, None
    if trainable:
        hold.hold(REPACKED_REMEDY)
    return hold, RepackingCheckHook(hold, parameters)


class LofitHandle:
    """What `patch_model` returns: the LoFiT parameters and the means to switch them off or remove them."""

    def __init__(self, model, heads, shape: AttentionShape, scale: bool, offset: bool, backend: str,
                 target_module: Optional[str] = None, trainable: bool = True):
        self.model = model
        self.heads = heads
        self.num_layers, self.num_heads, self.head_dim = shape.num_layers, shape.num_heads, shape.head_dim
        self.backend = backend
        self.target_module = target_module
        # Training settings that produced these parameters; save_pretrained writes them to adapter_config.json.
        self.method_settings: dict = {}
        o_projs = find_o_projs(model, target_module)
        device = first_parameter_device(o_projs[0])
        lofit = LofitParameters(heads, shape.head_dim, scale, offset, device)
        lofit.handle_ref = weakref.ref(self)
        self.lofit = lofit  # before install: _attach reads it
        self._installation = install(model, LOFIT_MODULE_NAME, lofit, o_projs, self._attach, trainable)

    def _live(self) -> LofitParameters:
        """The LoFiT module, or RuntimeError once the handle was removed."""
        if self.lofit is None:
            raise RuntimeError("this LoFiT handle was already removed (by remove(), merge_and_unload() or unload()) "
                               "and has no parameters; patch the model again (patch_model / load_adapter) to use LoFiT")
        return self.lofit

    def _tuned_layers(self):
        """(layer, its o_proj, the o_proj input columns of its heads, scale rows, offset rows) of every tuned
        layer, the tensors on that o_proj's device: what a merge and a LoRA export fold."""
        lofit = self._live()
        o_projs = find_o_projs(self.model, self.target_module)
        for layer in lofit.layers:
            head_index, scale, offset = lofit.layer_tensors(layer, first_parameter_device(o_projs[layer]))
            yield layer, o_projs[layer], head_columns(head_index, self.head_dim), scale, offset

    @property
    def scale(self) -> Optional[nn.Parameter]:
        return self._live().scale

    @property
    def offset(self) -> Optional[nn.Parameter]:
        return self._live().offset

    @property
    def enabled(self) -> bool:
        return self._live().enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._live().enabled = bool(value)

    def _attach(self, o_proj: nn.Module, layer: int):
        if self.lofit.scale is None and folds_offsets(o_proj):
            return o_proj.register_forward_hook(OffsetFoldHook(self.lofit, layer, self.head_dim))
        return o_proj.register_forward_pre_hook(TransformHook(self.lofit, layer, self.backend))

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model with LoFiT switched off inside the `with` block (e.g. a DPO reference)."""
        self._live()
        previous, self.enabled = self.enabled, False
        try:
            yield self.model
        finally:
            self.enabled = previous

    def save_pretrained(self, directory) -> None:
        """Write adapter_config.json and adapter_model.safetensors to `directory` (atomically)."""
        from .adapter import save_adapter

        save_adapter(self, directory)

    def export_peft_lora(self, directory) -> None:
        """Write the adapter as a standard PEFT LoRA adapter of o_proj (adapter_config.json and
        adapter_model.safetensors, atomically), which `peft.PeftModel.from_pretrained` loads onto the base model
        without lofit_fast (`lofit_fast.export` says how)."""
        spec = architecture_spec(self.model)
        tensors = {}
        with torch.no_grad():
            for layer, o_proj, columns, scale, offset in self._tuned_layers():
                name = f"{spec.layers}.{layer}.{self.target_module or spec.o_proj}"
                tensors.update(lora_of_layer(name, o_proj, columns, scale, offset))
        write_peft_lora(directory, tensors, getattr(self.model.config, "_name_or_path", None) or None)

    def merge_and_unload(self, engine: str = "transformers") -> nn.Module:
        """Fold the adapter into o_proj (offsets into its bias, scales into its weight columns; `lofit_fast.merge`),
        remove LoFiT, and return the plain model. Nothing is changed when a check fails.

        Args:
            engine: where the saved merged model will run, "transformers", "vllm" or "sglang". The offsets live in
                o_proj biases, which a checkpoint keeps only where that engine builds them (`lofit_fast.serving`):
                where it reads `config.attention_bias`, the flag is set and the other attention projections get
                zero biases; Mistral and Qwen2 without a sliding window come back as a LlamaForCausalLM holding
                the same weights (a new model object); elsewhere ValueError naming the reason and the alternatives.
        """
        self._live()
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
        model = self.model
        o_projs = find_o_projs(model, self.target_module)
        with torch.no_grad():
            folds = [plan_layer(o_proj, layer, columns, scale, offset)
                     for layer, o_proj, columns, scale, offset in self._tuned_layers()]
        bias_plan, missing_biases, llama_config = None, [], None
        if any(fold.offset is not None for fold in folds):
            bias_plan = plan_biases(model, engine)
            missing_biases = [layer for layer in (*o_projs, *attention_projections(model, o_projs))
                              if layer.bias is None]
            if bias_plan.check_transformers:
                check_transformers_builds_biases(model, missing_biases)
            if bias_plan.how == "relabel":
                llama_config = llama_config_of(model)
        quantized_bias_dtype = bias_dtype(model)
        with torch.no_grad():
            created = [fold_layer(fold, quantized_bias_dtype) for fold in folds]
        self.remove()
        for fold, bias in zip(folds, created):
            if bias is not None:
                bias.requires_grad_(fold.o_proj.weight.requires_grad)
        if bias_plan is not None:
            add_zero_biases(missing_biases, quantized_bias_dtype)
            if bias_plan.how == "flag":
                model.config.attention_bias = True
            else:
                model = relabelled_as_llama(model, llama_config)
            if bias_plan.note:
                warnings.warn(f"merge_and_unload(engine={engine!r}): {bias_plan.note}", stacklevel=2)
        return model

    def remove(self) -> nn.Module:
        """Take LoFiT out of the model: hooks, parameters, and the requires_grad flags it changed.
        Returns the model."""
        self._live()
        self._installation.undo()
        self._installation, self.lofit = None, None
        return self.model

    def __repr__(self):
        if self.lofit is None:
            return f"LofitHandle(removed; it had {len(self.heads)} heads)"
        return (f"LofitHandle({len(self.heads)} heads over {len(self.lofit.layers)} layers, "
                f"head_dim={self.head_dim}, scale={self.scale is not None}, offset={self.offset is not None}, "
                f"backend={self.backend!r})")


def handle_of(model: nn.Module) -> LofitHandle:
    """The LofitHandle of a model patched by `patch_model` / `load_adapter` (also inside a PEFT model), or of a
    LofitModel. ValueError if the model carries no LoFiT adapter."""
    handle = getattr(model, "handle", None)  # a LofitModel
    if isinstance(handle, LofitHandle):
        return handle
    lofit = getattr(base_transformer(model), LOFIT_MODULE_NAME, None)
    handle = lofit.handle_ref() if isinstance(lofit, LofitParameters) and lofit.handle_ref is not None else None
    if handle is None or handle.lofit is not lofit:  # a copy.deepcopy of a patched model keeps the original's
        raise ValueError(f"{type(model).__name__} carries no LoFiT adapter of its own: patch it with "
                         f"lofit_fast.patch_model or load_adapter, or wrap it with get_lofit_model")
    return handle


@dataclass
class Installation:
    """What `install` changed in a model, and `undo()` to change it back."""

    model: nn.Module
    module_name: str
    hooks: list
    requires_grad_before: dict  # every base parameter's flag before the base was frozen
    repacking_hold: Repacking4bitHold

    def undo(self) -> None:
        """Remove the hooks and the parameter module, give the remaining parameters their flags back, and end the
        hold on 4-bit repacking."""
        for hook in self.hooks:
            hook.remove()
        delattr(self.model, self.module_name)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self.requires_grad_before.get(name, parameter.requires_grad))
        self.repacking_hold.release()


def install(model: nn.Module, module_name: str, parameters: nn.Module, o_projs: list, attach_layer,
            trainable: bool) -> Installation:
    """Put `parameters` (a module whose `.layers` lists its layers, lowest first) into `model` as `module_name`,
    trainable or not, with the base frozen and `attach_layer(o_proj, layer)` hooking each of its layers (it
    returns the hook's handle). The hold on 4-bit repacking comes first, as it may refuse the model: nothing is
    changed before it."""
    parameters.requires_grad_(trainable)
    hold, check = hold_4bit_repacking(model, parameters.layers[0], parameters, trainable)
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.add_module(module_name, parameters)
    hooks = [attach_layer(o_projs[layer], layer) for layer in parameters.layers]
    if check is not None:
        hooks.append(o_projs[parameters.layers[0]].register_forward_pre_hook(check, prepend=True))
    return Installation(model, module_name, hooks, requires_grad_before, hold)


def folded_offset(o_proj: nn.Module, head_index: torch.Tensor, offset: torch.Tensor, head_dim: int,
                  input_dtype: torch.dtype) -> torch.Tensor:
    """The change of o_proj's output caused by adding `offset` to the selected heads of its input:
    W[:, selected columns] @ v for a plain Linear (fp32); for any other layer (bitsandbytes, ...)
    o_proj(v_hat) - o_proj(0) with one call (a row per offset and a row of zeros), exact for 4-bit (dequantize,
    then matmul). LLM.int8 quantizes each input row, so on an 8-bit o_proj this is the int8 image of v_hat, not
    of z + v_hat. `offset` is (K, head_dim) -> (out_features,), or (..., K, head_dim) for several offsets
    at once -> (..., out_features)."""
    columns = head_columns(head_index, head_dim)
    values = offset.flatten(-2)  # (..., K * head_dim)
    if type(o_proj) is nn.Linear:
        return torch.nn.functional.linear(values.float(), o_proj.weight.index_select(1, columns).float())
    count = values.numel() // columns.numel()
    rows = torch.arange(count, device=offset.device).repeat_interleave(columns.numel())
    inputs = torch.zeros(count, o_proj.in_features, dtype=input_dtype, device=offset.device)
    inputs = inputs.index_put((rows, columns.repeat(count)), values.reshape(-1).to(input_dtype))
    return linear_response(o_proj, inputs).reshape(*offset.shape[:-2], -1)


def head_columns(head_index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The input features of o_proj that the heads `head_index` occupy, head after head."""
    return (head_index[:, None] * head_dim + torch.arange(head_dim, device=head_index.device)).flatten()


def first_parameter_device(module: nn.Module) -> torch.device:
    """The device of `module`'s first parameter (the CPU when it has none)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def base_transformer(model: nn.Module) -> nn.Module:
    """The Hugging Face model that holds the decoder layers: `model` itself, or the model inside a PEFT
    wrapper (PeftModel.get_base_model(), where PEFT has already put its LoRA layers in place)."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def patch_model(model: nn.Module, heads=None, scale: bool = True, offset: bool = True,
                backend: str = "auto", target_module: Optional[str] = None) -> LofitHandle:
    """Add LoFiT to `model` in place and return the handle.

    Args:
        model: a Hugging Face causal LM of a known architecture (`ARCHITECTURES`), plain or bitsandbytes
            8-bit / 4-bit, or a PEFT model around one.
        heads: None for every query head of every layer, or an iterable of (layer, head); `handle.heads`
            keeps that order, and row i of `handle.scale` / `handle.offset` belongs to `handle.heads[i]`.
        scale, offset: which of the two vectors to learn (fp32, zero-initialised: identity).
        backend: "auto", "torch" or "triton" (see `lofit_fast.ops.head_affine`).
        target_module: the dotted path from a decoder layer to the module whose input LoFiT transforms, when
            it is not the architecture's attention output projection (e.g. "self_attn.o_proj.base_layer").
    The base model's parameters are frozen; the LoFiT parameters are the only trainable ones. A PEFT model
    (e.g. with LoRA) is patched inside: LoFiT goes into `model.get_base_model()`, and the LoRA
    parameters are frozen with the rest (set their requires_grad again to train both).
    On a bitsandbytes 4-bit model, the 4-bit layers are kept from repacking for bitsandbytes' CPU inference
    kernel, which has no backward (see `lofit_fast.bnb`), until the handle is removed; ValueError if it has
    repacked those that backward passes through already.
    """
    return attach(model, heads, scale=scale, offset=offset, backend=backend, target_module=target_module,
                  trainable=True)


def attach(model: nn.Module, heads, scale: bool, offset: bool, backend: str, target_module: Optional[str],
           trainable: bool) -> LofitHandle:
    """`patch_model`, with the LoFiT parameters trainable or not (`load_adapter` loads frozen adapters for
    inference, which may then run on bitsandbytes' 4-bit CPU inference kernel)."""
    model = model_to_attach(model, "patch_model", backend)
    if not (scale or offset):
        raise ValueError("scale and offset are both off; LoFiT needs at least one of them")
    if target_module is not None and (not isinstance(target_module, str) or not target_module):
        raise ValueError(f"target_module must be a dotted module path such as 'self_attn.o_proj', "
                         f"not {target_module!r}")
    shape = attention_shape(model, target_module)
    validated = _validate_heads(heads, shape)
    check_backend_runs(model, target_module, backend)
    return LofitHandle(model, validated, shape, scale, offset, backend, target_module, trainable=trainable)


# The attribute under which a model carries LoFiT, and what put it there: one model carries one of them.
ATTACHED_MODULES = {LOFIT_MODULE_NAME: "a LoFiT adapter (patch_model / load_adapter)",
                    ADAPTERS_MODULE_NAME: "adapters from load_adapters"}


def model_to_attach(model: nn.Module, caller: str, backend: str) -> nn.Module:
    """The Hugging Face model inside `model` (itself, or a PEFT model's base) that `caller` attaches LoFiT to,
    checked: a torch module that carries no LoFiT yet, and a known backend (TypeError / ValueError saying so)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} takes a torch.nn.Module, not {type(model).__name__}")
    model = base_transformer(model)
    for attribute, what in ATTACHED_MODULES.items():
        if hasattr(model, attribute):
            raise ValueError(f"this model already carries {what} as model.{attribute} (it is already patched); "
                             f"call that handle's remove() (or merge_and_unload()) first")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    return model


def check_backend_runs(model: nn.Module, target_module: Optional[str], backend: str) -> None:
    """For backend "triton", ValueError unless its kernels can run where the model's o_proj is."""
    if backend == "triton":
        resolve_backend("triton", first_parameter_device(find_o_projs(model, target_module)[0]), torch.float32)
