"""`load_adapters`: several LoFiT adapters on one base model, each batch row routed to its own adapter.

    handle = lofit_fast.load_adapters(model, {"math": "adapters/math", "qa": "adapters/qa"})
    out = handle(input_ids=ids, attention_mask=mask, adapter_names=["math", "qa", "__base__"])
    new = handle.generate(input_ids=ids, attention_mask=mask, adapter_names=["qa", "qa", "math"], max_new_tokens=8)

The adapters are numbered 0..A-1 in the order given. A route names one adapter per batch row ("__base__", or
-1 in an index tensor, for the plain base model), and row b then computes what the model patched with that
row's adapter alone computes (an offset-only adapter may take another rounding path: see `AdapterBank`).
Backward through a mixed batch trains every routed adapter at once, each on its own rows. Inside `generate`,
beams and `num_return_sequences` repeat each row and the route with it; anywhere else the batch that reaches a
layer must have one routed name per row.
"""

import contextlib
import dataclasses
import re
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .adapter import AdapterConfig, adapter_tensors, copy_values, read_adapter, write_adapter
from .ops import head_affine
from .patch import (
    ADAPTERS_MODULE_NAME,
    LofitParameters,
    add_to_output,
    check_backend_runs,
    find_o_projs,
    first_parameter_device,
    folded_offset,
    folds_offsets,
    install,
    model_to_attach,
)
from .version import __version__

BASE = "__base__"  # the adapter name of a row that runs the plain base model (index -1)


class AdapterBank(nn.ModuleDict):
    """`model.lofit_adapters`: one LofitParameters per adapter (name -> module, in load order), the per-layer
    tables that stack them, and the current route.

    For layer l: `head_index_{l}` (K,) is the union of the adapters' heads there; `scale_rows_{l}` /
    `offset_rows_{l}` (A, K) say which row of the scale / offset table fills each (adapter, head) slot. The
    table is a zero row followed by every adapter's parameter rows (those holding that tensor, in load
    order), so row 0 stands for "this adapter has no such head". Absent when no adapter of the layer has
    scales (offsets).

    How a layer computes: every forward stacks the adapters' parameters into (A, K, head_dim) scale / offset
    tensors (zeros, the identity, where an adapter lacks a head) by one differentiable gather from the adapters'
    own parameters, so each gradient lands in its own adapter; `head_affine(..., adapter_index=)` reads each row's
    through the index. A layer whose adapters are all offset-only folds them into o_proj's output instead
    (`W[:, sel] @ v_a`, one shift per adapter, gathered per row). So an offset-only adapter that shares a layer
    with one that has scales goes through the head transform, not the fold it takes alone, and rounds differently:
    on the tests' tiny models (logits up to 0.55) fp32 1.5e-7 apart, fp16 4.9e-4, bf16 3.9e-3; rows whose
    adapter takes the same path as alone are bitwise equal.
    """

    ATTRIBUTES = ("head_dim", "layers", "layer_adapters", "layer_has_scale", "adapter_index", "routed_adapters",
                  "expands", "_expanded")
    BUFFER = re.compile(r"(head_index|scale_rows|offset_rows)_\d+")

    def __init__(self, adapters: dict[str, LofitParameters], heads: dict[str, list], head_dim: int, device):
        super().__init__(adapters)
        self.head_dim = head_dim
        names = list(adapters)
        self.layers = sorted({layer for name in names for layer, _ in heads[name]})
        self.layer_adapters: dict[int, frozenset] = {}  # layer -> the adapters (numbers) with heads there
        self.layer_has_scale: dict[int, bool] = {}
        for layer in self.layers:
            union = sorted({head for name in names for at, head in heads[name] if at == layer})
            self.register_buffer(f"head_index_{layer}", torch.tensor(union, device=device), persistent=False)
            members = [i for i, name in enumerate(names) if any(at == layer for at, _ in heads[name])]
            self.layer_adapters[layer] = frozenset(members)
            for kind in ("scale", "offset"):
                rows = self._table_rows(kind, layer, union, heads)
                if rows is not None:
                    self.register_buffer(f"{kind}_rows_{layer}", rows.to(device), persistent=False)
            self.layer_has_scale[layer] = hasattr(self, f"scale_rows_{layer}")
        # The route (see `MultiAdapterHandle.route`): adapter number per row, the adapters it uses, and whether a
        # batch of several copies of each routed row may reach the layers (inside generate).
        self.adapter_index: Optional[torch.Tensor] = None
        self.routed_adapters: frozenset = frozenset()
        self.expands = False
        self._expanded: dict = {}  # (batch, device, inference mode) -> the index of that batch

    def _table_rows(self, kind: str, layer: int, union: list, heads: dict) -> Optional[torch.Tensor]:
        rows = torch.zeros(len(self), len(union), dtype=torch.long)
        first_row, used = 1, False  # row 0 of the table is the zero row
        for number, (name, adapter) in enumerate(self.items()):
            if getattr(adapter, kind) is None:
                continue
            for slot, (at, head) in enumerate(heads[name]):
                if at == layer:
                    rows[number, union.index(head)] = first_row + slot
                    used = True
            first_row += len(heads[name])
        return rows if used else None

    def layer_parameters(self, layer: int, kind: str, device: torch.device) -> Optional[torch.Tensor]:
        """The stacked (A, K, head_dim) scale or offset of `layer` on `device` (None when no adapter of the
        layer has it): one gather from the table, so each adapter's gradient lands in its own parameters."""
        rows = getattr(self, f"{kind}_rows_{layer}", None)
        if rows is None:
            return None
        parameters = [getattr(adapter, kind) for adapter in self.values() if getattr(adapter, kind) is not None]
        table = torch.cat([parameters[0].new_zeros(1, self.head_dim), *parameters])
        return table.index_select(0, rows.flatten()).view(*rows.shape, self.head_dim).to(device)

    def set_route(self, adapter_index: Optional[torch.Tensor], expands: bool = False) -> None:
        self.adapter_index, self.expands = adapter_index, expands
        used = [] if adapter_index is None else adapter_index.unique().tolist()
        self.routed_adapters = frozenset(number for number in used if number >= 0)
        self._expanded = {}

    def routes_layer(self, layer: int) -> bool:
        """Whether a routed row uses an adapter with heads in `layer` (if not, the layer is left alone)."""
        if self.adapter_index is None:
            raise RuntimeError(
                "no adapter route is set: call handle(..., adapter_names=[...]) or handle.generate(..., "
                "adapter_names=[...]), or run the model inside `with handle.route(adapter_names):` (one name "
                f"per batch row, {BASE!r} for the base model). With gradient checkpointing, backward runs the "
                f"forward again: call backward inside the route too")
        return not self.routed_adapters.isdisjoint(self.layer_adapters[layer])

    def layer_routing(self, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter number of each row of `z`, the heads of `layer`), both on z's device."""
        return self.index_for(z.shape[0], z.device), getattr(self, f"head_index_{layer}").to(z.device)

    def index_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """The adapter number of each of `batch` rows, on `device`: the routed index, or, inside generate (where
        beams and num_return_sequences repeat every input row, repeat_interleave), that index repeated row by
        row. Any other batch size is refused: how its rows relate to the route is not known."""
        # Keyed by inference mode too: an index made under torch.inference_mode() cannot enter autograd.
        key = (batch, device, torch.is_inference_mode_enabled())
        if key not in self._expanded:
            routed = self.adapter_index.shape[0]
            if batch == routed:
                index = self.adapter_index
            elif self.expands and batch % routed == 0:
                index = self.adapter_index.repeat_interleave(batch // routed)
            else:
                raise ValueError(
                    f"the batch reaching o_proj has {batch} rows, but the route has {routed}; route one adapter "
                    f"name per row of the batch the model runs (a batch that concatenates [chosen; rejected], as "
                    f"TRL's DPO does, needs names + names). Only handle.generate repeats the route, for beams and "
                    f"num_return_sequences")
            self._expanded[key] = index.to(device)
        return self._expanded[key]


# Hook objects hold the bank, like patch.py's, so that a copy.deepcopy of the model gets hooks reading the
# copy's parameters and route.

class RoutedTransformHook:
    """Forward pre-hook on o_proj: z' = the routed head transform of its input (scales, offsets or both)."""

    def __init__(self, bank: AdapterBank, layer: int, backend: str):
        self.bank, self.layer, self.backend = bank, layer, backend

    def __call__(self, module, args):
        if not self.bank.routes_layer(self.layer):
            return None
        z = args[0]
        index, head_index = self.bank.layer_routing(self.layer, z)
        scale = self.bank.layer_parameters(self.layer, "scale", z.device)
        offset = self.bank.layer_parameters(self.layer, "offset", z.device)
        # route() and load_adapters validated the indices once: no per-layer check (a device sync per decoding step).
        return (head_affine(z, head_index, scale, offset, backend=self.backend, adapter_index=index,
                            check_adapter_index=False, check_head_index=False), *args[1:])


class RoutedOffsetFoldHook:
    """Forward hook on a linear o_proj whose adapters are all offset-only: each adapter's offsets become one
    shift of o_proj's output, (A, out_features); row b adds the shift of its adapter (none for -1)."""

    def __init__(self, bank: AdapterBank, layer: int):
        self.bank, self.layer = bank, layer

    def __call__(self, module, args, output):
        if not self.bank.routes_layer(self.layer):
            return None
        z = args[0]
        index, head_index = self.bank.layer_routing(self.layer, z)
        offset = self.bank.layer_parameters(self.layer, "offset", z.device)
        shifts = folded_offset(module, head_index, offset, self.bank.head_dim, z.dtype)
        shifts = torch.cat([shifts.new_zeros(1, shifts.shape[-1]), shifts])  # row 0: the base model (-1)
        per_row = shifts.index_select(0, index + 1).to(output.dtype)
        return add_to_output(output, per_row.view(per_row.shape[0], *[1] * (output.dim() - 2), -1))


class MultiAdapterHandle:
    """What `load_adapters` returns: the adapters, the routing, and the means to save or remove them."""

    def __init__(self, model: nn.Module, configs: dict[str, AdapterConfig], tensors: dict[str, dict],
                 backend: str, trainable: bool):
        self.model = model
        self.backend = backend
        self.target_module = next(iter(configs.values())).target_module
        self._configs = configs
        o_projs = find_o_projs(model, self.target_module)
        device = first_parameter_device(o_projs[0])
        heads = {name: [tuple(item) for item in config.heads] for name, config in configs.items()}
        head_dim = next(iter(configs.values())).head_dim
        adapters = {name: _adapter_parameters(config, heads[name], tensors[name], device)
                    for name, config in configs.items()}
        bank = AdapterBank(adapters, heads, head_dim, device)
        self.bank = bank  # before install: _attach reads it
        self._installation = install(model, ADAPTERS_MODULE_NAME, bank, o_projs, self._attach, trainable)

    def _attach(self, o_proj: nn.Module, layer: int):
        if not self.bank.layer_has_scale[layer] and folds_offsets(o_proj):
            return o_proj.register_forward_hook(RoutedOffsetFoldHook(self.bank, layer))
        return o_proj.register_forward_pre_hook(RoutedTransformHook(self.bank, layer, self.backend))

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names; position i is adapter number i of an index route."""
        return list(self._live_bank().keys())

    def parameters_of(self, name: str) -> LofitParameters:
        """Adapter `name`'s parameters: `.scale` / `.offset`, fp32 (len(heads), head_dim) or None; row i
        belongs to `heads_of(name)[i]`."""
        bank = self._live_bank()
        if name not in bank:
            raise KeyError(f"no adapter named {name!r}; the adapters are {list(bank)}")
        return bank[name]

    def heads_of(self, name: str) -> list[tuple[int, int]]:
        """Adapter `name`'s heads, (layer, head), in the order of its parameter rows."""
        self.parameters_of(name)
        return [tuple(item) for item in self._configs[name].heads]

    def adapter_index(self, adapter_names: Union[Sequence[str], torch.Tensor]) -> torch.Tensor:
        """The int64 index (B,) of a route: a name per row ("__base__": -1), or integers in [-1, A) as they are."""
        bank = self._live_bank()
        names = list(bank)
        if isinstance(adapter_names, torch.Tensor):
            if adapter_names.dim() != 1 or adapter_names.dtype.is_floating_point or adapter_names.dtype == torch.bool:
                raise ValueError(f"an adapter index must be a 1-D integer tensor (one entry per row), not "
                                 f"{adapter_names.dtype} of shape {tuple(adapter_names.shape)}")
            index = adapter_names.long()
            if index.numel() and not bool(((index >= -1) & (index < len(names))).all()):
                raise ValueError(f"adapter index entries must be -1 (base model) or 0..{len(names) - 1} "
                                 f"(adapters {names}); got {index.tolist()}")
        else:
            if isinstance(adapter_names, str):
                raise TypeError(f"adapter_names must hold one name per batch row, e.g. [{adapter_names!r}], "
                                f"not a single string")
            numbers = {name: number for number, name in enumerate(names)}
            numbers[BASE] = -1
            unknown = [name for name in adapter_names if name not in numbers]
            if unknown:
                raise ValueError(f"unknown adapter name(s) {unknown}; the adapters are {names}, and {BASE!r} "
                                 f"runs a row on the base model")
            index = torch.tensor([numbers[name] for name in adapter_names], dtype=torch.long)
        if index.numel() == 0:
            raise ValueError("the route is empty; give one adapter name per batch row")
        return index.to(first_parameter_device(bank))

    @contextlib.contextmanager
    def route(self, adapter_names: Union[Sequence[str], torch.Tensor]):
        """Inside the `with` block, batch row b of every call of the model uses adapter `adapter_names[b]`
        (a name, or "__base__" for the base model; or a tensor of adapter numbers, -1 for the base model).
        Every call inside must run a batch of exactly len(adapter_names) rows (generate with beams: use
        `generate`). Routes nest: the previous one is restored on exit. The route is state of the model, so one
        model serves one routed batch at a time; under gradient checkpointing call backward inside the block, as
        it runs the layers' forward again."""
        with self._route(adapter_names, expands=False):
            yield self.model

    @contextlib.contextmanager
    def _route(self, adapter_names, expands: bool):
        """`route`, and with `expands` a batch of copies of each row (generate's) follows its row's adapter."""
        bank = self._live_bank()
        previous = bank.adapter_index, bank.expands
        bank.set_route(self.adapter_index(adapter_names), expands)
        try:
            yield self.model
        finally:
            bank.set_route(*previous)

    def forward(self, *args, adapter_names, **kwargs):
        """`model(*args, **kwargs)` with row b of the batch routed to `adapter_names[b]` (see `route`)."""
        self._check_rows(args, kwargs, adapter_names)
        with self.route(adapter_names):
            return self.model(*args, **kwargs)

    __call__ = forward

    def generate(self, *args, adapter_names, **kwargs):
        """`model.generate(*args, **kwargs)` with input row b routed to `adapter_names[b]`, its beams and
        returned sequences included (see `route`)."""
        self._check_rows(args, kwargs, adapter_names)
        with self._route(adapter_names, expands=True):
            return self.model.generate(*args, **kwargs)

    @staticmethod
    def _check_rows(args, kwargs, adapter_names) -> None:
        inputs = next((kwargs[key] for key in ("input_ids", "inputs", "inputs_embeds") if key in kwargs),
                      args[0] if args else None)
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != len(adapter_names):
            raise ValueError(f"the batch has {inputs.shape[0]} rows but adapter_names has {len(adapter_names)}; "
                             f"give one adapter name per row")

    def save_pretrained(self, directory, adapter_name: str) -> None:
        """Write adapter `adapter_name` to `directory` in the layout of `LofitHandle.save_pretrained`
        (`load_adapter` / `load_adapters` read it back), with its current parameters."""
        tensors = adapter_tensors(self.parameters_of(adapter_name))
        config = dataclasses.replace(self._configs[adapter_name], lofit_fast_version=__version__)
        write_adapter(directory, config, tensors)

    def remove(self) -> nn.Module:
        """Take the adapters out of the model: hooks, parameters, and the requires_grad flags it changed.
        Returns the model."""
        self._live_bank()
        self._installation.undo()
        self._installation, self.bank = None, None
        return self.model

    def _live_bank(self) -> AdapterBank:
        if self.bank is None:
            raise RuntimeError("these adapters were removed from the model")
        return self.bank

    def __repr__(self):
        if self.bank is None:
            return "MultiAdapterHandle(removed)"
        return (f"MultiAdapterHandle({len(self.bank)} adapters {list(self.bank)} over {len(self.bank.layers)} "
                f"layers, head_dim={self.bank.head_dim}, backend={self.backend!r})")


def _adapter_parameters(config: AdapterConfig, heads: list, tensors: dict, device) -> LofitParameters:
    adapter = LofitParameters(heads, config.head_dim, config.scale, config.offset, device)
    copy_values(adapter, tensors)
    return adapter


def _check_name(name) -> None:
    """Names become attributes of the bank (a ModuleDict): they must not clash with its own."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter names must be non-empty strings, not {name!r}")
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved for rows that run the base model; name the adapter otherwise")
    clashes = hasattr(AdapterBank, name) or name in AdapterBank.ATTRIBUTES or AdapterBank.BUFFER.fullmatch(name)
    if "." in name or clashes:
        raise ValueError(f"adapter name {name!r} is not allowed: names may not contain '.', nor be an attribute "
                         f"or method of the adapter bank (torch.nn.ModuleDict's, set_route, index_for, ..., or one "
                         f"of {AdapterBank.ATTRIBUTES}), nor look like 'head_index_3', 'scale_rows_3' or "
                         f"'offset_rows_3'")


def load_adapters(model: nn.Module, adapters: dict, backend: str = "auto",
                  trainable: bool = False) -> MultiAdapterHandle:
    """Load several LoFiT adapters onto `model` and return the handle that routes batch rows to them.

    Args:
        model: the base model the adapters were saved for (a PEFT model gets them inside).
        adapters: {name: adapter directory}, in order: adapter number i of an index route is the i-th. Names are
            non-empty strings without '.', and not "__base__" (the name of a base-model row).
        backend: "auto", "torch" or "triton", for the routed head transform (`lofit_fast.ops.head_affine`).
        trainable: whether the adapters' parameters require grad (the base model is frozen either way).

    Every file is read and checked against the model before the model is touched: each adapter must be saved
    for this architecture and shape, and all for the same target module; they may differ in heads and in
    kind (scale + offset, offset only, scale only). Each adapter's parameters are its own fp32 parameters under
    `model.lofit_adapters.<name>` (`handle.parameters_of(name)`). The model cannot carry `patch_model`'s
    single adapter at the same time. A PEFT model gets the adapters inside, as with `patch_model`.
    """
    model = model_to_attach(model, "load_adapters", backend)
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError("adapters must be a non-empty dict {name: adapter directory}")
    configs, tensors = {}, {}
    for name, directory in adapters.items():
        _check_name(name)
        configs[name], tensors[name] = read_adapter(model, directory)
    target_modules = {name: config.target_module for name, config in configs.items()}
    if len(set(target_modules.values())) > 1:
        raise ValueError(f"the adapters act on different modules ({target_modules}); adapters loaded together "
                         f"must share target_module")
    check_backend_runs(model, next(iter(target_modules.values())), backend)
    return MultiAdapterHandle(model, configs, tensors, backend, trainable)
