"""Adapter files: `save_adapter`, `load_adapter` and what they read and write.

An adapter is a directory in PEFT's layout:

    adapter_config.json          AdapterConfig below: which heads, the model shape, the training settings
    adapter_model.safetensors    `scale` and/or `offset`, fp32, (len(heads), head_dim); row i is heads[i]

Files are read with `json` and `safetensors` only (nothing is unpickled), checked against the model before
it is touched, and written atomically (`lofit_fast.io`), so a crash leaves the previous adapter in place.
Merging an adapter into the weights is `lofit_fast.merge`.
"""

import json
import os
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional

import safetensors
import torch
from torch import nn

from .io import check_finite, write_config_and_weights
from .patch import AttentionShape, LofitHandle, attach, attention_shape, base_transformer
from .version import __version__

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
    # A random id written into both files at each save: a crash between the two renames (new weights beside the
    # old config) is then detected on load instead of read as a mismatched pair. None in adapters saved before.
    save_id: Optional[str] = None

    def shape_text(self) -> str:
        return (f"{self.num_layers} layers x {self.num_heads} heads (head_dim {self.head_dim}) "
                f"of {self.architecture}")


def adapter_config(handle: LofitHandle) -> AdapterConfig:
    """The AdapterConfig describing `handle`'s adapter."""
    config = handle.model.config
    return AdapterConfig(
        lofit_fast_version=__version__,
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
            raw = json.load(file, parse_constant=_refuse_non_json_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    except _NonJsonConstant as error:
        raise ValueError(f"{path} is not valid JSON: it holds {error}, which strict JSON has no value for; "
                         f"save the adapter again") from None
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


class _NonJsonConstant(ValueError):
    pass


def _refuse_non_json_constant(name: str):
    """json's hook for NaN, Infinity and -Infinity, which Python writes by default but JSON does not have."""
    raise _NonJsonConstant(name)


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
    if config.save_id is not None and not isinstance(config.save_id, str):
        fail(f"save_id must be a string or null, not {config.save_id!r}")
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
    then is the weights file renamed over the old one, and the config right after it (`io.write_config_and_weights`).
    An error or a crash while writing leaves an existing adapter as it was and no temporary files behind; a
    crash between the two renames leaves files of two saves, which share no `save_id`, and loading them is
    refused (ValueError: save again). NaN or
    infinite values, in the tensors or in the config (strict JSON), are refused (ValueError) before anything is
    written.
    """
    check_finite(tensors, "the adapter's parameters hold", " (training diverged?); nothing was saved")
    save_id = uuid.uuid4().hex
    try:
        write_config_and_weights(directory, CONFIG_NAME, {**asdict(config), "save_id": save_id}, WEIGHTS_NAME,
                                 tensors, {"format": "pt", "save_id": save_id})
    except ValueError as error:  # raised before writing: the config is not strict JSON
        raise ValueError(f"{error}; the free-form part is the training settings, handle.method_settings; "
                         f"nothing was saved") from None


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
            metadata = file.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                         f"it may be truncated or corrupt: save the adapter again") from None
    # Both ids present and different: a torn save (weights are renamed first, so the config is the older one).
    # Weights without an id were not written by write_adapter; their contents are checked below as any others.
    if None not in (config.save_id, metadata.get("save_id")) and metadata["save_id"] != config.save_id:
        raise ValueError(f"{path} and {CONFIG_NAME} beside it come from different saves (save_id "
                         f"{metadata.get('save_id')!r} vs {config.save_id!r}): a save into this directory was "
                         f"interrupted between writing the two files; save the adapter again")
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
    check_finite(tensors, f"{path}: the tensors hold", "; the adapter was saved from a diverged run or is damaged")
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

    Args:
        model: the base model the adapter was saved for (a PEFT model gets it inside, as with patch_model).
        directory: written by `handle.save_pretrained` / `lofit tune`.
        backend: "auto", "torch" or "triton" (see `lofit_fast.ops.head_affine`).
        trainable: whether LoFiT's parameters require grad (the base stays frozen either way).
    The files are checked before the model is touched: the adapter must have been saved for the same
    architecture, number of layers, query heads and head_dim (ValueError naming the difference).
    The LoFiT parameters come back trainable (as `patch_model` makes them) so training can resume,
    with the base model frozen; pass `trainable=False` to load them frozen, for inference (on a bitsandbytes
    4-bit base, bitsandbytes may then use its CPU inference kernel: see `lofit_fast.bnb`).
    `handle.method_settings` holds the training settings saved with the adapter.
    """
    config, tensors = read_adapter(model, directory)
    return attach_adapter(model, config, tensors, backend, trainable)


def read_adapter(model: nn.Module, directory) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the adapter in `directory`, checked, and checked against `model` (which is
    not changed)."""
    config = read_config(directory)
    tensors = read_tensors(directory, config)
    check_compatible(config, model, directory)
    return config, tensors


def attach_adapter(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], backend: str,
                   trainable: bool) -> LofitHandle:
    """Patch `model` with an adapter from `read_adapter` and return the handle."""
    handle = attach(model, [tuple(item) for item in config.heads], scale=config.scale, offset=config.offset,
                    backend=backend, target_module=config.target_module, trainable=trainable)
    copy_values(handle, tensors)
    handle.method_settings = dict(config.method)
    return handle


def load_adapter_values(handle: LofitHandle, directory) -> None:
    """Copy the values of the adapter saved in `directory` into `handle`'s parameters (a Trainer checkpoint,
    to resume training). ValueError, before anything changes, unless it holds the same heads and vectors."""
    config = read_config(directory)
    tensors = read_tensors(directory, config)
    saved = ([tuple(item) for item in config.heads], config.scale, config.offset)
    if saved != (list(handle.heads), handle.scale is not None, handle.offset is not None):
        raise ValueError(f"the adapter in {os.fspath(directory)} (heads {saved[0]}, scale={saved[1]}, "
                         f"offset={saved[2]}) is not the one being trained (heads {handle.heads}, scale="
                         f"{handle.scale is not None}, offset={handle.offset is not None})")
    copy_values(handle, tensors)


def copy_values(parameters, tensors: dict[str, torch.Tensor]) -> None:
    """tensors["scale"] / ["offset"] into `parameters.scale` / `.offset` (a handle or a LofitParameters)."""
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameter = getattr(parameters, name)
            parameter.copy_(tensor.to(parameter.device, parameter.dtype))
