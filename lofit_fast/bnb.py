"""What lofit_fast knows about bitsandbytes, in one place: which layers are quantized, and how to keep its
4-bit CPU inference kernel out of training.

bitsandbytes is optional: every function here works (and finds nothing) when it is not installed.

Repacking. On x86 CPUs with AVX512-BF16, a `Linear4bit` repacks its weight for a fused inference kernel the
first time it runs in eval mode on an input that needs no grad, and from then on, in any mode, multiplies
with that kernel. The kernel has no backward, and bitsandbytes' unpacking does not restore the weight
(its block scales are rounded to bf16). So while a LoFiT adapter can train, no 4-bit layer may repack
(`Repacking4bitHold`), and one that backward needs and that is repacked already is refused. An adapter
loaded for inference leaves bitsandbytes' kernel alone.
"""

import contextlib
import logging
from typing import Optional

import torch
from torch import nn

_NOT_IMPORTED = object()
_bitsandbytes = _NOT_IMPORTED


def bitsandbytes_module():
    """The bitsandbytes module, or None when it is not installed. Its import-time notice that an optional
    accelerated CPU kernel (from the `kernels` package) could not be loaded is dropped: bitsandbytes falls
    back to its own kernel, and the notice would land in the middle of lofit's output."""
    global _bitsandbytes
    if _bitsandbytes is _NOT_IMPORTED:
        with _without_optional_kernel_notice():
            try:
                import bitsandbytes
            except ImportError:
                bitsandbytes = None
        _bitsandbytes = bitsandbytes
    return _bitsandbytes


# The logger of bitsandbytes' CPU backend, which gives the notice when it is imported on an AVX512-BF16 CPU.
_CPU_BACKEND_LOGGER = "bitsandbytes.backends.cpu.ops"


class _OptionalKernelNotice(logging.Filter):
    """Drops bitsandbytes' notice that the optional `kernels` package could not give it a CPU kernel."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


@contextlib.contextmanager
def _without_optional_kernel_notice():
    logger = logging.getLogger(_CPU_BACKEND_LOGGER)
    notice = _OptionalKernelNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def drop_optional_kernel_notice() -> None:
    """Drop the notice for the rest of the process, whoever imports bitsandbytes (transformers' Trainer does):
    the command line calls this first. Costs nothing; bitsandbytes is not imported."""
    logger = logging.getLogger(_CPU_BACKEND_LOGGER)
    if not any(isinstance(existing, _OptionalKernelNotice) for existing in logger.filters):
        logger.addFilter(_OptionalKernelNotice())


def quantization_of(layer: nn.Module) -> Optional[str]:
    """'4bit' for a bitsandbytes Linear4bit, '8bit' for a Linear8bitLt holding int8 weights, else None."""
    bnb = bitsandbytes_module()
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt) and not layer.state.has_fp16_weights:
        return "8bit"
    return None


def quantized_linears(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes Linear4bit and (int8-weight) Linear8bitLt layers of `model`."""
    return [module for module in model.modules() if quantization_of(module) is not None]


def is_repacked(layer: nn.Module) -> bool:
    """Whether a Linear4bit's weight is in bitsandbytes' packed CPU inference layout."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def linear4bit_layers(model: nn.Module, skip: tuple = ()) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every Linear4bit in `model`, except those inside the modules in `skip`."""
    if bitsandbytes_module() is None:
        return []
    skipped = {id(module) for part in skip for module in part.modules()}
    return [(name, module) for name, module in model.named_modules()
            if quantization_of(module) == "4bit" and id(module) not in skipped]


def compute_dtypes_4bit(model: nn.Module) -> set[torch.dtype]:
    """The dtypes `model`'s Linear4bit layers multiply in (bnb_4bit_compute_dtype); empty when it has none."""
    return {layer.compute_dtype for _, layer in linear4bit_layers(model) if layer.compute_dtype is not None}


# What to do when a trainable adapter meets repacked layers.
REPACKED_REMEDY = ("Load the model again and attach the adapter with trainable parameters (patch_model, "
                   "load_adapter(trainable=True), LofitModel.from_pretrained(is_trainable=True)) before running "
                   "the model in eval mode, or call lofit_fast.prepare_kbit_training(model) right after loading "
                   "it; to only run an adapter on this model, load it with trainable=False")


def repacking_error(names: list[str], remedy: str) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"bitsandbytes has repacked the 4-bit weights of {shown} for its CPU inference kernel (it does so "
            f"on CPUs with AVX512-BF16 at the first eval-mode call without grad), and that kernel has no "
            f"backward, so LoFiT's gradients would be lost. {remedy}")


# Set on a 4-bit layer that `keep_unpacked` (prepare_kbit_training) switched off for good: a hold that ends must
# not switch it back on.
KEPT_UNPACKED = "_lofit_fast_kept_unpacked"


def keep_unpacked(layer: nn.Module) -> None:
    """Keep a Linear4bit off bitsandbytes' repacking path for good (what `prepare_kbit_training` asks for)."""
    layer.support_avx512bf16_for_cpu = False
    setattr(layer, KEPT_UNPACKED, True)


class Repacking4bitHold:
    """A trainable adapter's hold on the model's 4-bit layers. `hold()` keeps every one of them off
    bitsandbytes' repacking path (so the model computes the same in eval and train mode, and backward can pass
    through any of them), and refuses if one that backward passes through is repacked already: all but the
    layers inside the modules `off_path` (the decoder layers below the adapter's lowest one, ...). `release()`
    gives the layers back the setting they had."""

    def __init__(self, model: nn.Module, off_path: tuple = ()):
        self.layers = linear4bit_layers(model)
        self.on_path = linear4bit_layers(model, skip=off_path)
        self._previous: list[tuple[nn.Module, bool]] = []

    def __bool__(self) -> bool:
        return bool(self.layers)

    def repacked(self) -> list[str]:
        """The layers that backward passes through and bitsandbytes has repacked."""
        return [name for name, layer in self.on_path if is_repacked(layer)]

    def hold(self, remedy: str, error: type = ValueError) -> None:
        """Stop the layers from repacking; `error(...)` naming the repacked ones and `remedy` if backward would
        pass through a repacked layer (then nothing is changed)."""
        repacked = self.repacked()
        if repacked:
            raise error(repacking_error(repacked, remedy))
        for _, layer in self.layers:
            if layer.support_avx512bf16_for_cpu:
                self._previous.append((layer, True))
                layer.support_avx512bf16_for_cpu = False

    def release(self) -> None:
        """Give the layers back the repacking setting they had before `hold`, except those that
        `keep_unpacked` has kept off since (prepare_kbit_training called while the adapter was attached)."""
        for layer, setting in self._previous:
            if not getattr(layer, KEPT_UNPACKED, False):
                layer.support_avx512bf16_for_cpu = setting
        self._previous = []


class RepackingCheckHook:
    """Forward pre-hook on the o_proj of an adapter's lowest layer (the first layer of its gradient path to
    run). When a forward will need gradients for the adapter's parameters, it holds the 4-bit layers off the
    repacking path, and raises if one that backward needs was repacked meanwhile (an adapter loaded for
    inference, its parameters made trainable afterwards), so a gradient is never silently lost."""

    def __init__(self, hold: Repacking4bitHold, parameters: nn.Module):
        self.hold, self.parameters = hold, parameters

    def __call__(self, module, args):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters.parameters()):
            self.hold.hold(REPACKED_REMEDY, error=RuntimeError)
        return None


def linear_response(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """layer(x) - layer(0) for each row x of `inputs` (n, in_features), fp32 (n, out_features): the linear part of
    an affine layer, in one call with a zero row appended. `.forward`, not `__call__`: this runs inside LoFiT's
    own hooks, which must not fire again."""
    probe = torch.cat([inputs, inputs.new_zeros(1, inputs.shape[-1])])
    outputs = layer.forward(probe).float()
    return outputs[:-1] - outputs[-1]


def weight_columns(layer: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """W[:, columns] in fp32, for a linear layer: its weight, or for a bitsandbytes layer the weight it multiplies
    by, dequantized (exact for 4-bit)."""
    quantization = quantization_of(layer)
    if quantization is None:
        return layer.weight.index_select(1, columns).float()
    bnb = bitsandbytes_module()
    if quantization == "4bit":
        if is_repacked(layer):
            # The packed CPU layout has no public dequantization: read the columns through the layer itself,
            # layer(e_j) - layer(0) (exact: its kernel dequantizes, then multiplies).
            unit_rows = torch.eye(layer.in_features, device=columns.device).index_select(0, columns)
            return linear_response(layer, unit_rows.to(layer.compute_dtype or torch.float32)).T
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        return weight.index_select(1, columns.to(weight.device)).float()
    # LLM.int8: int8 rows CB with one absmax per output row, SCB. After the first forward call they live in
    # layer.state (weight.data is CB again), before it on the weight.
    state = layer.state
    int8_rows = state.CB if state.CB is not None else getattr(layer.weight, "CB", None)
    if int8_rows is None:
        int8_rows = layer.weight.data
    row_scales = state.SCB if state.SCB is not None else getattr(layer.weight, "SCB", None)
    if row_scales is None or int8_rows.dtype != torch.int8:
        raise ValueError(f"could not find the int8 weight and row scales of {type(layer).__name__}; use an "
                         f"unquantized base instead")
    weight = bnb.functional.int8_vectorwise_dequant(int8_rows, row_scales)
    return weight.index_select(1, columns.to(weight.device)).float()
