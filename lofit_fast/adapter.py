"""Adapter files and merging: `save_adapter`, `load_adapter`, `merge_and_unload`.

An adapter is a directory in PEFT's layout:

    adapter_config.json          AdapterConfig below: which heads, the model shape, the training settings
    adapter_model.safetensors    `scale` and/or `offset`, fp32, (len(heads), head_dim); row i is heads[i]

Files are read with `json` and `safetensors` only (nothing is unpickled), and written atomically: each
file goes to a temporary name beside its target, is flushed to disk, then renamed over it, so a crash
leaves the previous adapter in place.

Merging folds the adapter into each patched layer's o_proj (W: weight, b: bias, v_hat / A_hat: the
offsets / scales, zero outside the selected heads):

    o_proj(diag(1 + A_hat) z + v_hat) = (W diag(1 + A_hat)) z + (b + W[:, sel] @ v_sel)

so the selected columns of W are multiplied by 1 + A and W[:, sel] @ v (computed with the unscaled W)
is added to the bias, in fp32, then cast to the layer's dtype.
"""

import contextlib
import copy
import json
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional

import safetensors
import safetensors.torch
import torch
from torch import nn

from .bnb import bitsandbytes_module, is_repacked, quantization_of
from .io import atomic_path
from .patch import AttentionShape, LofitHandle, attach, attention_shape, base_transformer, find_o_projs

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# ----------------------------------------------------------------------------------------------
# adapter_config.json
# ----------------------------------------------------------------------------------------------

@dataclass
class AdapterConfig:
    """The contents of adapter_config.json."""

    lofit_fast_version: str
    architecture: str  # model.config.model_type
    base_model_name_or_path: Optional[str]
    num_layers: int
    num_heads: int  # query heads per layer
    head_dim: int
    heads: list  # [[layer, head], ...] in slot order: row i of the tensors belongs to heads[i]
    scale: bool
    offset: bool
    method: dict = field(default_factory=dict)  # the training settings (handle.method_settings)
    target_module: Optional[str] = None  # patch_model's target_module; None: the architecture's o_proj

    def shape_text(self) -> str:
        return (f"{self.num_layers} layers x {self.num_heads} heads (head_dim {self.head_dim}) "
                f"of {self.architecture}")


def _library_version() -> str:
    from . import __version__  # imported here: lofit_fast/__init__.py imports this module

    return __version__


def adapter_config(handle: LofitHandle) -> AdapterConfig:
    """The AdapterConfig describing `handle`'s adapter."""
    config = handle.model.config
    return AdapterConfig(
        lofit_fast_version=_library_version(),
        architecture=config.model_type,
        base_model_name_or_path=getattr(config, "_name_or_path", None) or None,
        num_layers=handle.num_layers,
        num_heads=handle.num_heads,
        head_dim=handle.head_dim,
        heads=[[layer, head] for layer, head in handle.heads],
        scale=handle.scale is not None,
        offset=handle.offset is not None,
        method=dict(handle.method_settings),
        target_module=handle.target_module,
    )


def read_config(directory) -> AdapterConfig:
    """Parse and check adapter_config.json; FileNotFoundError if it is missing, ValueError if it is not
    a valid LoFiT adapter config (the message names the file and what is wrong)."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoFiT adapter config at {path}"
                                + ("" if os.path.isdir(directory) else f" (the directory {directory} does not exist)"))
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    required = [f.name for f in fields(AdapterConfig) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ValueError(f"{path} is missing the key(s) {', '.join(missing)}; was it written by lofit_fast?")
    # Unknown keys are ignored, so adapters from newer versions that only add keys still load.
    config = AdapterConfig(**{f.name: raw[f.name] for f in fields(AdapterConfig) if f.name in raw})
    _check_config(config, path)
    return config


def _check_config(config: AdapterConfig, path: str) -> None:
    def fail(message):
        raise ValueError(f"{path}: {message}")

    for name in ("num_layers", "num_heads", "head_dim"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"{name} must be a positive integer, not {value!r}")
    for name in ("scale", "offset"):
        if not isinstance(getattr(config, name), bool):
            fail(f"{name} must be true or false, not {getattr(config, name)!r}")
    if not (config.scale or config.offset):
        fail("scale and offset are both false; an adapter holds at least one of them")
    if not isinstance(config.architecture, str):
        fail(f"architecture must be a string (the model_type), not {config.architecture!r}")
    if config.base_model_name_or_path is not None and not isinstance(config.base_model_name_or_path, str):
        fail(f"base_model_name_or_path must be a string or null, not {config.base_model_name_or_path!r}")
    if config.target_module is not None and (not isinstance(config.target_module, str) or not config.target_module):
        fail(f"target_module must be a dotted module path or null, not {config.target_module!r}")
    if not isinstance(config.method, dict):
        fail(f"method must be a JSON object, not {config.method!r}")
    if not isinstance(config.heads, list) or not config.heads:
        fail(f"heads must be a non-empty list of [layer, head] pairs, not {config.heads!r}")
    seen = set()
    for item in config.heads:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            fail(f"heads must be a list of [layer, head] pairs of integers; found {item!r}")
        layer, head = item
        if not (0 <= layer < config.num_layers and 0 <= head < config.num_heads):
            fail(f"head {item} is outside the {config.num_layers} layers x {config.num_heads} heads "
                 f"the adapter says it was saved for")
        if (layer, head) in seen:
            fail(f"head {item} is listed twice")
        seen.add((layer, head))


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def adapter_tensors(handle) -> dict[str, torch.Tensor]:
    """The adapter's tensors as saved: fp32, contiguous, on the CPU. `handle`: anything with `.scale` and
    `.offset` (a LofitHandle, or one adapter's LofitParameters of `load_adapters`)."""
    tensors = {"scale": handle.scale, "offset": handle.offset}
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items() if t is not None}


def save_adapter(handle: LofitHandle, directory) -> None:
    """Write `handle`'s adapter_config.json and adapter_model.safetensors into `directory` (see write_adapter)."""
    if handle.lofit is None:
        raise RuntimeError("this LoFiT handle was removed; there is no adapter to save")
    write_adapter(directory, adapter_config(handle), adapter_tensors(handle))


def write_adapter(directory, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write `config` as adapter_config.json and `tensors` (fp32, contiguous, on the CPU) as
    adapter_model.safetensors into `directory` (created if missing).

    Both files are first written in full to temporary files in `directory` and flushed to disk; only
    then is the weights file renamed over the old one, and the config right after it. An error or a
    crash while writing leaves an existing adapter as it was and no temporary files behind.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = asdict(config)
    with atomic_path(os.path.join(directory, CONFIG_NAME)) as config_temporary:
        with open(config_temporary, "w", encoding="utf-8") as file:
            try:
                json.dump(config, file, indent=2)
            except TypeError as error:
                raise ValueError(f"the method settings (handle.method_settings) must hold only JSON values "
                                 f"({error})") from None
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as weights_temporary:
            safetensors.torch.save_file(tensors, weights_temporary, metadata={"format": "pt"})
        # The weights are in place; leaving the outer block puts the config beside them.
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the renames durable too (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def read_tensors(directory, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """Read adapter_model.safetensors and check it against `config`: exactly the tensors the config
    names, floating point, each (len(heads), head_dim)."""
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoFiT adapter weights at {path}")
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                         f"it may be truncated or corrupt: save the adapter again") from None
    expected = [name for name in ("scale", "offset") if getattr(config, name)]
    if sorted(tensors) != sorted(expected):
        raise ValueError(f"{path} holds the tensors {sorted(tensors)}, but {CONFIG_NAME} says "
                         f"{expected} (scale={config.scale}, offset={config.offset})")
    shape = (len(config.heads), config.head_dim)
    for name in expected:
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"({len(config.heads)} heads x head_dim {config.head_dim})")
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
    return tensors


def check_compatible(config: AdapterConfig, model: nn.Module, directory) -> None:
    """ValueError unless the adapter in `directory` was saved for a model of this architecture and shape."""
    shape: AttentionShape = attention_shape(base_transformer(model), config.target_module)
    model_type = getattr(model.config, "model_type", None)
    differences = [f"{what} differ ({saved} vs {found})" for what, saved, found in (
        ("architectures", config.architecture, model_type),
        ("layers", config.num_layers, shape.num_layers),
        ("heads", config.num_heads, shape.num_heads),
        ("head_dims", config.head_dim, shape.head_dim),
    ) if saved != found]
    if differences:
        raise ValueError(
            f"the adapter in {os.fspath(directory)} was saved for {config.shape_text()}; this model has "
            f"{shape.num_layers} layers x {shape.num_heads} heads (head_dim {shape.head_dim}) of {model_type}: "
            f"{', '.join(differences)}")


def load_adapter(model: nn.Module, directory, backend: str = "auto", trainable: bool = True) -> LofitHandle:
    """Patch `model` with the adapter saved in `directory` and return the handle.

    The files are checked before the model is touched: the adapter must have been saved for the same
    architecture, number of layers, query heads and head_dim (ValueError naming the difference).
    The LoFiT parameters come back trainable (as `patch_model` makes them) so training can resume,
    with the base model frozen; pass `trainable=False` to load them frozen, for inference (on a bitsandbytes
    4-bit base, bitsandbytes may then use its CPU inference kernel: see `lofit_fast.bnb`).
    `handle.method_settings` holds the training settings saved with the adapter.
    """
    config = read_config(directory)
    tensors = read_tensors(directory, config)
    check_compatible(config, model, directory)
    handle = attach(model, [tuple(item) for item in config.heads], scale=config.scale, offset=config.offset,
                    backend=backend, target_module=config.target_module, trainable=trainable)
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameter = getattr(handle, name)
            parameter.copy_(tensor.to(parameter.device, parameter.dtype))
    handle.method_settings = dict(config.method)
    return handle


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------

def _dequantized_columns(o_proj: nn.Module, quantization: Optional[str], columns: torch.Tensor) -> torch.Tensor:
    """W[:, columns] in fp32. For bitsandbytes layers: the weight the layer multiplies by, dequantized."""
    if quantization is None:
        return o_proj.weight.index_select(1, columns).float()
    bnb = bitsandbytes_module()
    if quantization == "4bit":
        quant_state = o_proj.weight.quant_state
        if is_repacked(o_proj):
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel after the first inference
            # call; there is no public dequantization of that layout, so read W[:, columns] through the
            # layer itself: o_proj(e_j) - o_proj(0) is column j (exact: dequantize, then matmul). `.forward`
            # skips LoFiT's hook, which is still attached while merging.
            probe = torch.eye(o_proj.in_features, device=columns.device).index_select(0, columns)
            probe = torch.cat([probe, torch.zeros_like(probe[:1])]).to(o_proj.compute_dtype or torch.float32)
            rows = o_proj.forward(probe).float()
            return (rows[:-1] - rows[-1:]).T
        weight = bnb.functional.dequantize_4bit(o_proj.weight.data, quant_state)
        return weight.index_select(1, columns.to(weight.device)).float()
    # LLM.int8: int8 rows CB with one absmax per output row, SCB. After the first forward call they live
    # in o_proj.state (weight.data is CB again), before it on the weight.
    state = o_proj.state
    int8_rows = state.CB if state.CB is not None else getattr(o_proj.weight, "CB", None)
    if int8_rows is None:
        int8_rows = o_proj.weight.data
    row_scales = state.SCB if state.SCB is not None else getattr(o_proj.weight, "SCB", None)
    if row_scales is None or int8_rows.dtype != torch.int8:
        raise ValueError(f"could not find the int8 weight and row scales of {type(o_proj).__name__}; "
                         f"merge into an unquantized base instead")
    weight = bnb.functional.int8_vectorwise_dequant(int8_rows, row_scales)
    return weight.index_select(1, columns.to(weight.device)).float()


@dataclass
class _LayerFold:
    """What merging changes in one layer's o_proj."""

    o_proj: nn.Module
    quantization: Optional[str]
    columns: torch.Tensor  # the input features of the selected heads
    scale: Optional[torch.Tensor]  # (len(columns),) fp32, None when absent or all zero
    offset: Optional[torch.Tensor]  # (len(columns),) fp32, None when absent or all zero


def _plan(handle: LofitHandle) -> list[_LayerFold]:
    """Gather each patched layer's fold and check that it can be done, before any weight changes."""
    o_projs = find_o_projs(handle.model, handle.target_module)
    plan = []
    with torch.no_grad():
        for layer in handle.lofit.layers:
            o_proj = o_projs[layer]
            quantization = quantization_of(o_proj)
            if not isinstance(o_proj, nn.Linear) or (quantization is None and not o_proj.weight.is_floating_point()):
                raise ValueError(f"layer {layer}: cannot merge into an o_proj of type {type(o_proj).__name__}; "
                                 f"merging supports torch.nn.Linear and bitsandbytes Linear4bit / Linear8bitLt. "
                                 f"Keep the adapter unmerged (load_adapter) instead")
            device = o_proj.weight.device
            if device.type == "meta":
                raise ValueError(f"layer {layer}: o_proj's weight is on the meta device (offloaded?); "
                                 f"load the model fully onto a device before merging")
            head_index, scale, offset = handle.lofit.layer_tensors(layer, device)
            columns = (head_index[:, None] * handle.head_dim
                       + torch.arange(handle.head_dim, device=device)).flatten()
            scale = scale.reshape(-1).float() if scale is not None and bool(scale.any()) else None
            offset = offset.reshape(-1).float() if offset is not None and bool(offset.any()) else None
            if quantization and scale is not None:
                raise ValueError(
                    f"layer {layer}: the adapter has non-zero scales, and o_proj holds {quantization} "
                    f"bitsandbytes weights, which cannot be rescaled column by column without quantizing "
                    f"again. Merge into an unquantized copy of the base model, or keep the adapter unmerged "
                    f"(load_adapter)")
            plan.append(_LayerFold(o_proj, quantization, columns, scale, offset))
    return plan


def _bias_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a new bias beside a quantized weight: the model's first floating parameter's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _fold(fold: _LayerFold, bias_dtype: torch.dtype) -> Optional[nn.Parameter]:
    """Fold one layer; returns the bias parameter if one had to be created."""
    o_proj, created = fold.o_proj, None
    weight_columns = _dequantized_columns(o_proj, fold.quantization, fold.columns)  # unscaled W[:, sel], fp32
    if fold.offset is not None:
        shift = weight_columns @ fold.offset
        if o_proj.bias is None:
            dtype = o_proj.weight.dtype if o_proj.weight.is_floating_point() else bias_dtype
            created = nn.Parameter(shift.to(dtype), requires_grad=False)
            o_proj.bias = created
        else:
            o_proj.bias.copy_((o_proj.bias.float() + shift.to(o_proj.bias.device)).to(o_proj.bias.dtype))
    if fold.scale is not None:  # plain weights only (checked in _plan)
        scaled = (weight_columns * (1 + fold.scale)).to(o_proj.weight.dtype)
        o_proj.weight.index_copy_(1, fold.columns, scaled)
    return created


def merge_and_unload(handle: LofitHandle) -> nn.Module:
    """Fold the adapter into o_proj, remove LoFiT, and return the plain model.

    Plain weights: the selected columns of W are multiplied by 1 + A, and W[:, sel] @ v is added to
    o_proj's bias (created where o_proj has none; it follows the weight's requires_grad flag). All in
    fp32, cast to the weight's dtype.

    bitsandbytes o_proj: offsets go into the bias, computed from the dequantized weight; the quantized
    weight is not touched. For 4-bit this equals the patched model (it dequantizes, then multiplies).
    LLM.int8 at inference quantizes its input row by row, so the merged int8 model computes
    W Q(z) + W v where the patched one computes W Q(z + v): a slightly different, equally valid LoFiT on
    an int8 base, and the more accurate image of v. Non-zero scales on a quantized o_proj are refused
    (ValueError) rather than quantizing the weight again: merge into an unquantized copy of the base, or
    keep the adapter unmerged. Nothing is changed when a check fails.

    A created bias must survive `save_pretrained` / `from_pretrained`, which builds o_proj from the
    config. Where the config has `attention_bias` (Llama, Gemma, Qwen3, OLMo, Granite, ...), it is set
    to True and the other attention projections get zero biases, so the saved model reloads exactly;
    where o_proj's bias is not configurable (Mistral, Qwen2, Phi-3, Mixtral), a warning says that a
    reloaded copy would lose the offsets.
    """
    if handle.lofit is None:
        raise RuntimeError("this LoFiT handle was already removed")
    plan = _plan(handle)
    model = handle.model
    with torch.no_grad():
        created = [_fold(fold, _bias_dtype(model)) for fold in plan]
    handle.remove()
    for fold, bias in zip(plan, created):
        if bias is not None:
            bias.requires_grad_(fold.o_proj.weight.requires_grad)
    if any(bias is not None for bias in created):
        _make_config_keep_biases(model)
    return model


def _make_config_keep_biases(model: nn.Module) -> None:
    """Set `config.attention_bias = True` and give every projection that this asks for a zero bias, so
    `from_pretrained` of the saved merged model builds (and loads) the o_proj biases; warn if impossible."""
    config = model.config
    reason = None
    if getattr(config, "attention_bias", None) is True:
        return
    if getattr(config, "attention_bias", None) is None:
        reason = "its config has no attention_bias setting"
    else:
        candidate = copy.deepcopy(config)
        candidate.attention_bias = True
        try:
            with torch.device("meta"):
                skeleton = type(model)(candidate)
        except Exception as error:  # any model class that cannot be built this way: fall back to the warning
            reason = f"a {type(model).__name__} with attention_bias=True could not be built ({error})"
        else:
            present = {name for name, _ in model.named_parameters()}
            missing = [name for name, _ in skeleton.named_parameters() if name not in present]
            modules = [model.get_submodule(name.rpartition(".")[0]) if name.endswith(".bias") else None
                       for name in missing]
            if all(isinstance(module, nn.Linear) and module.bias is None for module in modules):
                for module in modules:
                    dtype = module.weight.dtype if module.weight.is_floating_point() else _bias_dtype(model)
                    zeros = torch.zeros(module.out_features, dtype=dtype, device=module.weight.device)
                    module.bias = nn.Parameter(zeros, requires_grad=module.weight.requires_grad)
                config.attention_bias = True
                return
            reason = "attention_bias=True asks for parameters other than projection biases"
    warnings.warn(
        f"merge_and_unload put the offsets into new o_proj biases, but {config.model_type} cannot declare "
        f"them ({reason}): the merged model computes the adapted function, but a copy saved with "
        f"save_pretrained and loaded with from_pretrained will drop the biases. Keep the adapter unmerged "
        f"(save it and use load_adapter) to ship this model.", stacklevel=3)
