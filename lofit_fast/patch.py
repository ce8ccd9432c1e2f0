"""`patch_model`: attach LoFiT to the `o_proj` of a Hugging Face causal LM.

A forward pre-hook on each layer's `o_proj` that holds a selected head replaces its input `z` with
`z'`, through `lofit_fast.ops.head_affine`. The LoFiT parameters live in one small module,
`model.lofit`, so they show in `named_parameters()`, move with `model.to()` and are the only
parameters left trainable. `handle.remove()` takes all of it away again.
"""

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .ops import BACKENDS, head_affine, resolve_backend

LOFIT_MODULE_NAME = "lofit"


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


def _architecture(model: nn.Module) -> ArchitectureSpec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ValueError(
        f"lofit_fast does not know the architecture {model_type!r} "
        f"(supported: {', '.join(sorted(ARCHITECTURES))}). If its layers have an attention output "
        f"projection, point at it with lofit_fast.register_architecture({model_type!r}, "
        f"layers='model.layers', o_proj='self_attn.o_proj') using the dotted paths of your model.")


def find_o_projs(model: nn.Module) -> list[nn.Module]:
    """The attention output projection of every decoder layer, lowest layer first."""
    spec = _architecture(model)
    try:
        layers = model.get_submodule(spec.layers)
        return [layer.get_submodule(spec.o_proj) for layer in layers]
    except AttributeError as error:
        raise ValueError(
            f"could not find {spec.layers}[i].{spec.o_proj} in {type(model).__name__} ({error}); "
            f"fix the paths with lofit_fast.register_architecture({model.config.model_type!r}, "
            f"layers=..., o_proj=...)") from None


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int  # query heads
    head_dim: int


def attention_shape(model: nn.Module) -> AttentionShape:
    """Layers, query heads and head size. `head_dim` is not always hidden_size // heads (Gemma, Qwen3)."""
    o_projs = find_o_projs(model)
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
    layer and `head_index_{l}` the heads they act on, in the same order.
    """

    def __init__(self, heads, head_dim, scale: bool, offset: bool, device):
        super().__init__()
        shape = (len(heads), head_dim)
        self.scale = nn.Parameter(torch.zeros(shape, device=device)) if scale else None
        self.offset = nn.Parameter(torch.zeros(shape, device=device)) if offset else None
        self.layers = sorted({layer for layer, _ in heads})
        for layer in self.layers:
            slots = [i for i, (l, _) in enumerate(heads) if l == layer]
            self.register_buffer(f"slots_{layer}", torch.tensor(slots, device=device), persistent=False)
            self.register_buffer(f"head_index_{layer}", torch.tensor([heads[i][1] for i in slots], device=device),
                                 persistent=False)

    def layer_tensors(self, layer: int, device: torch.device):
        """(head_index, scale rows, offset rows) of one layer, on `device`."""
        slots = getattr(self, f"slots_{layer}")
        head_index = getattr(self, f"head_index_{layer}").to(device)
        scale = self.scale.index_select(0, slots).to(device) if self.scale is not None else None
        offset = self.offset.index_select(0, slots).to(device) if self.offset is not None else None
        return head_index, scale, offset


class LofitHandle:
    """What `patch_model` returns: the LoFiT parameters and the means to switch them off or remove them."""

    def __init__(self, model, heads, shape: AttentionShape, scale: bool, offset: bool, backend: str):
        self.model = model
        self.heads = heads
        self.num_layers, self.num_heads, self.head_dim = shape.num_layers, shape.num_heads, shape.head_dim
        self.backend = backend
        self.enabled = True
        # Training settings that produced these parameters; save_pretrained writes them to adapter_config.json.
        self.method_settings: dict = {}
        self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        o_projs = find_o_projs(model)
        device = _first_parameter_device(o_projs[0])
        self.lofit = LofitParameters(heads, shape.head_dim, scale, offset, device)
        model.add_module(LOFIT_MODULE_NAME, self.lofit)
        self._hooks = [self._attach(o_projs[layer], layer) for layer in self.lofit.layers]

    @property
    def scale(self) -> Optional[nn.Parameter]:
        return self.lofit.scale

    @property
    def offset(self) -> Optional[nn.Parameter]:
        return self.lofit.offset

    def _attach(self, o_proj: nn.Module, layer: int):
        if self.lofit.scale is None:
            return o_proj.register_forward_hook(self._make_offset_fold_hook(layer))
        return o_proj.register_forward_pre_hook(self._make_transform_hook(layer))

    def _make_transform_hook(self, layer: int):
        """Scales (and offsets, in the same pass): replace o_proj's input z with z'."""
        def apply_lofit(module, args):
            if not self.enabled:
                return None
            z = args[0]
            head_index, scale, offset = self.lofit.layer_tensors(layer, z.device)
            return (head_affine(z, head_index, scale, offset, backend=self.backend), *args[1:])

        return apply_lofit

    def _make_offset_fold_hook(self, layer: int):
        """Offsets only: o_proj(z + v_hat) = o_proj(z) + (o_proj(v_hat) - o_proj(0)), so the offsets enter
        as one vector added to o_proj's output and no per-token work touches z. Backward gets
        dL/dv = W_sel^T sum_t dL/dy through the small shift computation, and dL/dz is unchanged."""
        def add_folded_offset(module, args, output):
            if not self.enabled:
                return None
            z = args[0]
            head_index, _, offset = self.lofit.layer_tensors(layer, z.device)
            shift = folded_offset(module, head_index, offset, self.head_dim, z.dtype).to(output.dtype)
            try:
                # In place: o_proj's backward does not need its output, and a new tensor would cost a pass.
                return output.add_(shift)
            except RuntimeError:
                # Autograd refuses (before changing anything) when the output is a view made inside an
                # autograd Function or without grad, as LLM.int8's reshaped result is: add out of place.
                return output + shift

        return add_folded_offset

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model with LoFiT switched off inside the `with` block (e.g. a DPO reference)."""
        previous, self.enabled = self.enabled, False
        try:
            yield self.model
        finally:
            self.enabled = previous

    def save_pretrained(self, directory) -> None:
        """Write adapter_config.json and adapter_model.safetensors to `directory` (atomically)."""
        from .adapter import save_adapter

        save_adapter(self, directory)

    def merge_and_unload(self) -> nn.Module:
        """Fold the adapter into o_proj (offsets into its bias, scales into its weight columns), remove
        LoFiT, and return the plain model."""
        from .adapter import merge_and_unload

        return merge_and_unload(self)

    def remove(self) -> nn.Module:
        """Take LoFiT out of the model: hooks, parameters, and the requires_grad flags it changed.
        Returns the model."""
        if self.lofit is None:
            raise RuntimeError("this LoFiT handle was already removed")
        for hook in self._hooks:
            hook.remove()
        delattr(self.model, LOFIT_MODULE_NAME)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad_before.get(name, parameter.requires_grad))
        self._hooks, self.lofit = [], None
        return self.model

    def __repr__(self):
        return (f"LofitHandle({len(self.heads)} heads over {len(self.lofit.layers) if self.lofit else 0} layers, "
                f"head_dim={self.head_dim}, scale={self.scale is not None}, offset={self.offset is not None}, "
                f"backend={self.backend!r})")


def folded_offset(o_proj: nn.Module, head_index: torch.Tensor, offset: torch.Tensor, head_dim: int,
                  input_dtype: torch.dtype) -> torch.Tensor:
    """The change of o_proj's output caused by adding `offset` to the selected heads of its input:
    W[:, selected columns] @ v for a plain Linear (fp32); for any other layer (bitsandbytes, ...)
    o_proj(v_hat) - o_proj(0) with one two-row call, exact for 4-bit (dequantize, then matmul). LLM.int8
    quantizes each input row, so on an 8-bit o_proj this is the int8 image of v_hat, not of z + v_hat."""
    columns = (head_index[:, None] * head_dim + torch.arange(head_dim, device=head_index.device)).flatten()
    if type(o_proj) is nn.Linear:
        return torch.nn.functional.linear(offset.reshape(-1).float(), o_proj.weight.index_select(1, columns).float())
    probe = torch.zeros(2, o_proj.in_features, dtype=input_dtype, device=offset.device)
    probe = probe.index_put((torch.zeros_like(columns), columns), offset.reshape(-1).to(input_dtype))
    # .forward, not __call__: this runs inside o_proj's own forward hook, which must not fire again.
    rows = o_proj.forward(probe)
    return rows[0].float() - rows[1].float()


def _first_parameter_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def patch_model(model: nn.Module, heads=None, scale: bool = True, offset: bool = True,
                backend: str = "auto") -> LofitHandle:
    """Add LoFiT to `model` in place and return the handle.

    heads: None for every query head of every layer, or an iterable of (layer, head); `handle.heads`
        keeps that order, and row i of `handle.scale` / `handle.offset` belongs to `handle.heads[i]`.
    scale, offset: which of the two vectors to learn (fp32, zero-initialised: identity).
    backend: "auto", "torch" or "triton" (see `lofit_fast.ops.head_affine`).
    The base model's parameters are frozen; the LoFiT parameters are the only trainable ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model takes a torch.nn.Module, not {type(model).__name__}")
    if hasattr(model, LOFIT_MODULE_NAME):
        raise ValueError("this model is already patched with LoFiT; call handle.remove() (or "
                         "handle.merge_and_unload()) first, then patch again")
    if not (scale or offset):
        raise ValueError("scale and offset are both off; LoFiT needs at least one of them")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    shape = attention_shape(model)
    validated = _validate_heads(heads, shape)
    if backend == "triton":
        o_proj = find_o_projs(model)[0]
        resolve_backend("triton", _first_parameter_device(o_proj), torch.float32)
    return LofitHandle(model, validated, shape, scale, offset, backend)
