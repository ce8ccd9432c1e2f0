"""The LoFiT head transform of one layer as a registered torch op, `head_affine`, and its plain PyTorch
implementation.

    z'_h = (1 + scale_k) * z_h + offset_k   for h = head_index[k];   z'_h = z_h for other heads

`z` is the input of one layer's `o_proj`, (..., num_heads * head_dim); `scale` / `offset` are (K, head_dim) fp32
master weights (either may be None), or (A, K, head_dim) for several adapters routed by batch row. Two backends
compute it: "triton" (the fused kernels in `lofit_fast.kernels`) and "torch" (this file: the CPU path and the test
oracle, exact in fp64). Both run behind one `torch.library.custom_op` with one autograd rule, so
`torch.compile(fullgraph=True)` sees one opaque node and backward saves the same thing either way: the selected
heads' slice of z, and only when the scale needs a gradient.
"""

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Plain PyTorch implementation
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (the reference runs in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _saves_input(z, head_index, head_dim) -> bool:
    """With every head selected, backward's copy of the selected heads would be all of z: z itself is
    saved instead (same memory, no copy)."""
    return head_index.numel() * head_dim == z.shape[-1]


def _by_head(params, head_index):
    """(..., K, D) rows in slot order -> (..., H, D) rows in head order; only called when every head is selected."""
    return params.new_empty(params.shape).index_copy_(-2, head_index, params)


def _params_for_tokens(params, adapter_index, compute, z_dim, identity):
    """`params` in `compute` precision, shaped to broadcast against z's (..., K, D) heads: the (K, D) rows
    themselves, or with `adapter_index` each batch row's adapter rows, (B, 1, ..., 1, K, D), with the value
    `identity` in rows whose index is -1."""
    params = params.to(compute)
    if adapter_index is None:
        return params
    rows = params.index_select(0, adapter_index.clamp(min=0))
    rows = torch.where((adapter_index >= 0)[:, None, None], rows, identity)
    return rows.view(rows.shape[0], *([1] * (z_dim - 2)), *rows.shape[1:])


def _multiplier(scale, adapter_index, compute, z_dim):
    """1 + scale, per batch row when routed; exactly 1 in rows whose adapter index is -1."""
    return 1 + _params_for_tokens(scale, adapter_index, compute, z_dim, 0.0)


def _shift(offset, adapter_index, compute, z_dim):
    """The offset, per batch row when routed; -0.0 in rows whose adapter index is -1: x + (-0.0) is x for
    every x, -0.0 included (x + 0.0 would turn -0.0 into 0.0), so those rows come back bit for bit."""
    return _params_for_tokens(offset, adapter_index, compute, z_dim, -0.0)


def head_affine_torch_forward(z, head_index, scale, offset, save_selected, adapter_index=None):
    """Returns (z', z_selected): z_selected is the selected heads of z, (tokens, K, head_dim), when
    saved for the scale's gradient and fewer than all heads are selected, else an empty tensor.
    With `adapter_index` (B,), scale / offset are (A, K, head_dim) and row b of z uses adapter
    adapter_index[b] (none for -1)."""
    head_dim = (scale if scale is not None else offset).shape[-1]
    compute = _compute_dtype(z.dtype)
    z_heads = z.unflatten(-1, (-1, head_dim))
    empty = z.new_empty((0,))
    if _saves_input(z, head_index, head_dim):
        # Every head: one dense multiply-add over z, no gather or scatter.
        multiplier = shift = None
        if scale is not None:
            multiplier = _by_head(_multiplier(scale, adapter_index, compute, z.dim()), head_index)
        if offset is not None:
            shift = _by_head(_shift(offset, adapter_index, compute, z.dim()), head_index)
        transformed = z_heads.to(compute)
        if multiplier is not None and shift is not None:
            transformed = torch.addcmul(shift, transformed, multiplier)
        elif multiplier is not None:
            transformed = transformed * multiplier
        else:
            transformed = transformed + shift
        # Contiguous like the other path and the kernels (and the fake): a strided z would otherwise
        # give an output with z's strides.
        return transformed.to(z.dtype).flatten(-2).contiguous(), empty
    selected = z_heads.index_select(-2, head_index)
    transformed = selected.to(compute)
    if scale is not None:
        transformed = transformed * _multiplier(scale, adapter_index, compute, z.dim())
    if offset is not None:
        transformed = transformed + _shift(offset, adapter_index, compute, z.dim())
    out = z_heads.clone(memory_format=torch.contiguous_format)
    out.index_copy_(-2, head_index, transformed.to(z.dtype))
    num_tokens = z.shape[:-1].numel()
    z_selected = (selected.reshape(num_tokens, head_index.numel(), head_dim) if save_selected and scale is not None
                  else empty)
    return out.flatten(-2), z_selected


# Rows of (K, head_dim) per step of the token sum of g * z: about 1 MB of fp32 per chunk keeps the product
# in cache instead of materialising a full-size temporary (and, for bf16, a full fp32 copy of g).
_SUM_CHUNK_ELEMENTS = 1 << 18


def _token_sum_of_products(g_rows, z_rows, compute):
    """sum_t g[t] * z[t] over the first dimension, in `compute` precision, one chunk of rows at a time."""
    rows = max(1, _SUM_CHUNK_ELEMENTS // max(1, g_rows.shape[1:].numel()))
    total = torch.zeros(g_rows.shape[1:], dtype=compute, device=g_rows.device)
    for g_chunk, z_chunk in zip(g_rows.split(rows), z_rows.split(rows)):
        total += (g_chunk.to(compute) * z_chunk.to(compute)).sum(0)
    return total


def _token_rows(heads, adapter_index, tokens_per_row):
    """(..., K, D) heads -> (tokens, K, D), the layout the token sums run over (the first dimension); with
    `adapter_index`, (tokens per row, B, K, D), so that the same sums give one (K, D) result per batch row."""
    if adapter_index is None:
        return heads.reshape(heads.shape[:-2].numel(), *heads.shape[-2:])  # not -1: K may be 0
    return heads.reshape(adapter_index.shape[0], tokens_per_row, *heads.shape[-2:]).transpose(0, 1)


def head_affine_torch_backward(grad_out, saved, head_index, scale, head_dim,
                               need_grad_z, need_grad_scale, need_grad_offset, adapter_index=None):
    """Returns (grad_z or None, grad_scale or None, grad_offset or None); grad_z is None when there is
    no scale (the gradient passes through unchanged) or when it is not needed. `saved` is z itself when
    every head is selected, else the selected heads of z in slot order (see the forward).

    With `adapter_index` the scale and offset sums come per batch row, (B, K, head_dim); the registered op
    reduces them to the adapters with `rows_to_adapters`, for this backend and the kernels alike."""
    compute = _compute_dtype(grad_out.dtype)
    g_heads = grad_out.unflatten(-1, (-1, head_dim))
    tokens_per_row = grad_out.shape[1:-1].numel()  # used only when routed, where z has at least 2 dims
    grad_scale = grad_offset = grad_z = None
    if _saves_input(grad_out, head_index, head_dim):
        g_rows = _token_rows(g_heads, adapter_index, tokens_per_row)
        if need_grad_scale and scale is not None:
            z_rows = _token_rows(saved.unflatten(-1, (-1, head_dim)), adapter_index, tokens_per_row)
            grad_scale = _token_sum_of_products(g_rows, z_rows, compute).index_select(-2, head_index)
        if need_grad_offset:
            grad_offset = g_rows.sum(0, dtype=compute).index_select(-2, head_index)
        if need_grad_z and scale is not None:
            multiplier = _by_head(_multiplier(scale, adapter_index, compute, grad_out.dim()), head_index)
            grad_z = (g_heads.to(compute) * multiplier).to(grad_out.dtype).flatten(-2).contiguous()
        return grad_z, grad_scale, grad_offset
    g_selected = g_heads.index_select(-2, head_index).to(compute)
    g_rows = _token_rows(g_selected, adapter_index, tokens_per_row)
    if need_grad_scale and scale is not None:
        grad_scale = _token_sum_of_products(g_rows, _token_rows(saved, adapter_index, tokens_per_row), compute)
    if need_grad_offset:
        grad_offset = g_rows.sum(0)
    if need_grad_z and scale is not None:
        grad_z = g_heads.clone(memory_format=torch.contiguous_format)
        multiplier = _multiplier(scale, adapter_index, compute, grad_out.dim())
        grad_z.index_copy_(-2, head_index, (g_selected * multiplier).to(grad_out.dtype))
        grad_z = grad_z.flatten(-2)
    return grad_z, grad_scale, grad_offset


def rows_to_adapters(per_row, adapter_index, num_adapters):
    """(B, K, D) sums per batch row -> (A, K, D) sums per adapter, rows with index -1 left out; adapters no row
    uses get zeros. Each adapter's rows are picked with a one-hot (A, B) mask and summed in a fixed order:
    deterministic on every device (no atomics, unlike index_add_ on CUDA). Picked, not multiplied: as a
    one-hot matmul, 0 * inf = NaN would carry a non-finite row (say, of the base model, index -1) into every
    adapter's gradient, and TF32 (if enabled for fp32 matmuls) would round the sums to 10 mantissa bits."""
    one_hot = torch.arange(num_adapters, device=per_row.device)[:, None] == adapter_index[None, :]
    rows = per_row.flatten(1)
    # Blocks of adapters, so that the (adapters, B, K * D) temporary stays near _SUM_CHUNK_ELEMENTS.
    adapters_per_block = max(1, _SUM_CHUNK_ELEMENTS // max(1, rows.numel()))
    per_adapter = [torch.where(block[:, :, None], rows, 0).sum(1) for block in one_hot.split(adapters_per_block)]
    return torch.cat(per_adapter).view(num_adapters, *per_row.shape[1:])


def head_affine_reference(z, head_index, scale=None, offset=None, adapter_index=None):
    """The transform written out head by head: short enough to check by eye, differentiable by autograd.
    Tests run it in fp64 as the oracle for both backends. With `adapter_index` it goes row by row, each row
    through the single-adapter transform with its adapter's (K, D) rows, or unchanged for index -1."""
    if adapter_index is not None:
        rows = [row if adapter < 0 else head_affine_reference(row, head_index,
                                                              None if scale is None else scale[adapter],
                                                              None if offset is None else offset[adapter])
                for row, adapter in zip(z.unbind(0), adapter_index.tolist())]
        return torch.stack(rows) if rows else z.clone()
    head_dim = (scale if scale is not None else offset).shape[-1]
    heads = list(z.unflatten(-1, (-1, head_dim)).unbind(-2))
    for slot, head in enumerate(head_index.tolist()):
        if scale is not None:
            heads[head] = heads[head] * (1 + scale[slot])
        if offset is not None:
            heads[head] = heads[head] + offset[slot]
    return torch.stack(heads, dim=-2).flatten(-2)


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------

def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; it ships for Linux)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    if device.type == "cpu":
        return ("Triton compiles for GPUs and these tensors are on the CPU; set TRITON_INTERPRET=1 "
                "before importing lofit_fast to run the kernels in Triton's interpreter")
    return f"Triton kernels run on CUDA devices, not on {device.type!r}"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'torch' or 'triton' for a tensor on `device` of `dtype`; ValueError when `backend` cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if reason is None and dtype not in _TRITON_DTYPES:
        reason = f"the kernels take fp32, bf16 or fp16 activations, not {dtype}"
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run: {reason}. Use backend='torch' or 'auto'.")
    return "torch" if reason is not None else "triton"


def _kernels():
    # Imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined.
    from lofit_fast import kernels

    return kernels


# ----------------------------------------------------------------------------------------------
# Registered op
# ----------------------------------------------------------------------------------------------

def _values_unreadable(index: Tensor) -> bool:
    """Whether an index's values need not (empty) or may not (a CUDA graph is being captured: no sync) be read."""
    return index.numel() == 0 or (index.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_adapter_index_range(adapter_index, num_adapters):
    """ValueError unless every entry of adapter_index is in [-1, num_adapters). Checked here, in host code that
    every call with check_adapter_index=True runs, eager or under torch.compile (the op is opaque to the compiler,
    so this costs no graph break). Reading min and max costs one device sync per call; skipped while a CUDA graph
    is being captured, where a sync is not allowed."""
    if _values_unreadable(adapter_index):
        return
    low, high = torch.stack(torch.aminmax(adapter_index)).tolist()
    if low < -1 or high >= num_adapters:
        raise ValueError(f"adapter_index holds values in [{low}, {high}], outside [-1, {num_adapters}): -1 leaves "
                         f"a row unchanged and 0..{num_adapters - 1} pick one of the {num_adapters} adapters "
                         f"stacked in scale / offset")


def _check_head_index_values(head_index, num_heads):
    """ValueError unless head_index holds distinct heads in [0, num_heads): otherwise the forward would silently
    skip a head out of range (and use only one slot of a repeated head) while the backward without grad_z reads
    that head's columns, outside g. Free for a CPU index; one device sync otherwise (skipped while a CUDA graph
    is captured)."""
    if _values_unreadable(head_index):
        return
    values = head_index.tolist()
    if min(values) < 0 or max(values) >= num_heads:
        raise ValueError(f"head_index holds heads in [{min(values)}, {max(values)}], outside [0, {num_heads}): z "
                         f"has {num_heads} heads of this head_dim")
    if len(set(values)) != len(values):
        raise ValueError(f"head_index names a head more than once ({values}); give each head one slot")


@torch.library.custom_op("lofit_fast::head_affine", mutates_args=())
def _head_affine_op(z: Tensor, head_index: Tensor, scale: Optional[Tensor], offset: Optional[Tensor],
                    save_selected: bool, backend: str,
                    adapter_index: Optional[Tensor] = None,
                    check_adapter_index: bool = True, check_head_index: bool = True) -> tuple[Tensor, Tensor]:
    if check_head_index:
        _check_head_index_values(head_index, z.shape[-1] // (scale if scale is not None else offset).shape[-1])
    if adapter_index is not None and check_adapter_index:
        _check_adapter_index_range(adapter_index, (scale if scale is not None else offset).shape[0])
    if backend == "triton":
        return _kernels().head_affine_forward(z, head_index, scale, offset, save_selected, adapter_index)
    return head_affine_torch_forward(z, head_index, scale, offset, save_selected, adapter_index)


@_head_affine_op.register_fake
def _(z, head_index, scale, offset, save_selected, backend, adapter_index=None, check_adapter_index=True,
      check_head_index=True):
    # Same shapes in both modes: z' is z's shape, z_selected has one row per token of z.
    head_dim = (scale if scale is not None else offset).shape[-1]
    num_tokens = z.numel() // z.shape[-1]
    copies = save_selected and scale is not None and not _saves_input(z, head_index, head_dim)
    saved_shape = (num_tokens, head_index.shape[0], head_dim) if copies else (0,)
    return z.new_empty(z.shape), z.new_empty(saved_shape)


@torch.library.custom_op("lofit_fast::head_affine_backward", mutates_args=())
def _head_affine_backward_op(grad_out: Tensor, saved: Tensor, head_index: Tensor,
                             scale: Optional[Tensor], head_dim: int, need_grad_z: bool,
                             need_grad_scale: bool, need_grad_offset: bool,
                             backend: str, adapter_index: Optional[Tensor] = None,
                             num_adapters: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Custom ops return no None, so a gradient that is not computed comes back as an empty tensor.
    With `adapter_index` both backends return scale / offset sums per batch row, reduced here to the
    `num_adapters` adapters by one piece of code."""
    implementation = _kernels().head_affine_backward if backend == "triton" else head_affine_torch_backward
    grad_z, grad_scale, grad_offset = implementation(grad_out, saved, head_index, scale, head_dim,
                                                     need_grad_z, need_grad_scale, need_grad_offset,
                                                     adapter_index)
    if adapter_index is not None:
        grad_scale, grad_offset = (None if grad is None else rows_to_adapters(grad, adapter_index, num_adapters)
                                   for grad in (grad_scale, grad_offset))
    return tuple(grad_out.new_empty((0,)) if grad is None else grad for grad in (grad_z, grad_scale, grad_offset))


@_head_affine_backward_op.register_fake
def _(grad_out, saved, head_index, scale, head_dim, need_grad_z, need_grad_scale, need_grad_offset,
      backend, adapter_index=None, num_adapters=0):
    # A fresh tensor per output: returning one object twice tells the tracer the outputs alias, and
    # AOTAutograd then hands the offset's gradient to the scale as well.
    def empty():
        return grad_out.new_empty((0,))

    def param_grad():
        # (K, head_dim), or (A, K, head_dim) with one block per adapter when routed.
        block = (head_index.shape[0], head_dim)
        shape = block if adapter_index is None else (num_adapters, *block)
        return grad_out.new_empty(shape, dtype=_compute_dtype(grad_out.dtype))

    grad_z = grad_out.new_empty(grad_out.shape) if need_grad_z and scale is not None else empty()
    return (grad_z, param_grad() if need_grad_scale and scale is not None else empty(),
            param_grad() if need_grad_offset else empty())


def _setup_context(ctx, inputs, output):
    z, head_index, scale, offset, save_selected, backend, adapter_index, *_ = inputs
    params = scale if scale is not None else offset
    ctx.head_dim = params.shape[-1]
    ctx.num_adapters = params.shape[0] if adapter_index is not None else 0
    saves_input = save_selected and scale is not None and _saves_input(z, head_index, ctx.head_dim)
    ctx.save_for_backward(z if saves_input else output[1], head_index, scale, adapter_index)
    ctx.backend = backend
    # z_selected is an output only so that it can be saved: its gradient is always None, and
    # materialising it would fill a (tokens, K, head_dim) tensor of zeros on every backward.
    ctx.set_materialize_grads(False)
    ctx.scale_dtype = scale.dtype if scale is not None else None
    ctx.offset_dtype = offset.dtype if offset is not None else None


def _backward(ctx, grad_out, _grad_z_selected):
    saved, head_index, scale, adapter_index = ctx.saved_tensors
    need_grad_z, _, need_grad_scale, need_grad_offset = ctx.needs_input_grad[:4]
    if grad_out is None:  # z' did not reach the loss (grads are not materialised, see _setup_context)
        return (None,) * 9
    if need_grad_scale and saved.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError("lofit_fast::head_affine was called with save_selected=False, but the scale "
                           "needs a gradient; call lofit_fast.ops.head_affine, which sets it")
    grad_z, grad_scale, grad_offset = _head_affine_backward_op(
        grad_out, saved, head_index, scale, ctx.head_dim,
        need_grad_z, need_grad_scale, need_grad_offset, ctx.backend, adapter_index, ctx.num_adapters)
    if need_grad_z and scale is None:
        grad_z = grad_out  # the transform is a shift: its gradient passes through unchanged
    return (grad_z if need_grad_z else None, None,
            grad_scale.to(ctx.scale_dtype) if need_grad_scale else None,
            grad_offset.to(ctx.offset_dtype) if need_grad_offset else None, None, None, None, None, None)


_head_affine_op.register_autograd(_backward, setup_context=_setup_context)


_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_index_and_channels(z, head_index, scale, offset):
    """ValueError unless head_index is a 1-D integer tensor on z's device with one entry per slot of scale /
    offset, and z's channels are whole heads of their head_dim. Metadata only: no device sync."""
    if not isinstance(head_index, Tensor) or head_index.dtype not in _INDEX_DTYPES or head_index.dim() != 1:
        found = (f"{head_index.dtype} of shape {tuple(head_index.shape)}" if isinstance(head_index, Tensor)
                 else type(head_index).__name__)
        raise ValueError(f"head_index must be a 1-D int64 (or int32) tensor, not {found}; use "
                         f"torch.tensor(heads, dtype=torch.long, device=z.device)")
    if head_index.device != z.device:
        raise ValueError(f"head_index is on {head_index.device} and z on {z.device}; move it to z's device")
    for name, value in (("scale", scale), ("offset", offset)):
        if value is None or value.dim() < 2:
            continue
        if value.shape[-2] != head_index.shape[0]:
            raise ValueError(f"{name} has {value.shape[-2]} head slots (shape {tuple(value.shape)}) and head_index "
                             f"{head_index.shape[0]} heads; give one (head_dim,) row per selected head")
        if value.shape[-1] == 0 or z.dim() == 0 or z.shape[-1] % value.shape[-1]:
            raise ValueError(f"z has {z.shape[-1] if z.dim() else 0} channels, not a whole number of heads of "
                             f"{name}'s head_dim {value.shape[-1]}; z's last dim is num_heads * head_dim")
    if scale is not None and offset is not None and scale.shape[-2:] != offset.shape[-2:]:
        raise ValueError(f"scale {tuple(scale.shape)} and offset {tuple(offset.shape)} must have the same "
                         f"(K, head_dim)")


def _check_param_shapes(z, head_index, scale, offset, adapter_index):
    """ValueError unless the parameters (and adapter_index, when given) have the shapes of their mode. Shapes,
    dtypes and devices only: nothing here reads device memory (the range is checked in the op)."""
    _check_index_and_channels(z, head_index, scale, offset)
    params = (("scale", scale), ("offset", offset))
    if adapter_index is None:
        for name, value in params:
            if value is not None and value.dim() != 2:
                raise ValueError(f"{name} has shape {tuple(value.shape)}; it must be (K, head_dim), or "
                                 f"(adapters, K, head_dim) together with adapter_index")
        return
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype not in _INDEX_DTYPES:
        found = adapter_index.dtype if isinstance(adapter_index, Tensor) else type(adapter_index).__name__
        raise ValueError(f"adapter_index must be an int64 (or int32) tensor, not {found}; use "
                         f"torch.as_tensor(indices, dtype=torch.long, device=z.device)")
    if adapter_index.dim() != 1 or z.dim() < 2 or adapter_index.shape[0] != z.shape[0]:
        raise ValueError(f"adapter_index has shape {tuple(adapter_index.shape)} and z {tuple(z.shape)}: pass one "
                         f"adapter per row of z along dim 0, shape (z.shape[0],), -1 for a row that uses none; z "
                         f"needs at least 2 dims (batch, ..., channels), e.g. (batch, 1, channels) when decoding")
    if adapter_index.device != z.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} and z on {z.device}; move it to z's device")
    for name, value in params:
        if value is not None and value.dim() != 3:
            raise ValueError(f"with adapter_index, {name} must be (adapters, K, head_dim), one (K, head_dim) block "
                             f"per adapter, not of shape {tuple(value.shape)}")
    if scale is not None and offset is not None and scale.shape[0] != offset.shape[0]:
        raise ValueError(f"scale holds {scale.shape[0]} adapters and offset {offset.shape[0]}; stack the same "
                         f"adapters in both (zeros where an adapter has no scale or no offset)")


def head_affine(z: Tensor, head_index: Tensor, scale: Optional[Tensor] = None,
                offset: Optional[Tensor] = None, backend: str = "auto",
                adapter_index: Optional[Tensor] = None, check_adapter_index: bool = True,
                check_head_index: bool = True) -> Tensor:
    """Apply `z'_h = (1 + scale) * z_h + offset` to the heads in `head_index`; the other heads pass unchanged.

    Args:
        z: the input of one layer's o_proj, (..., num_heads * head_dim), any float dtype, any strides.
        head_index: the selected heads, int64 (K,), on z's device; slot k of scale / offset acts on head_index[k].
        scale, offset: (K, head_dim), usually fp32 master weights; either may be None, not both.
        backend: "auto" (Triton for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1; torch otherwise),
            "torch" or "triton".
        adapter_index: several adapters in one batch: an int64 (or int32) tensor (B,) on z's device for z of
            shape (B, ..., C); scale / offset are then (A, K, head_dim), one block per adapter (a head an adapter
            does not use holds zeros), and row b uses adapter adapter_index[b], none for -1. Their gradients are
            (A, K, head_dim): each adapter's sums over its own rows.
        check_adapter_index: raise ValueError for an entry outside [-1, A), at the cost of one device sync per
            call. False for an index validated once beforehand (a route of `load_adapters` is): the op never
            syncs, and on the Triton backend a row with an index out of range passes unchanged.
        check_head_index: raise ValueError for a head_index entry out of range or repeated: free for a CPU
            index, one device sync per call otherwise. False for an index validated once beforehand (the hooks
            of `patch_model` / `load_adapters` pass False): the kernels trust it.
    Returns z' with z's shape and dtype (contiguous).
    """
    if scale is None and offset is None:
        raise ValueError("head_affine needs a scale, an offset or both; both are None")
    _check_param_shapes(z, head_index, scale, offset, adapter_index)
    backend = resolve_backend(backend, z.device, z.dtype)
    # Only a scale that is being trained needs the selected heads of z saved for backward.
    save_selected = scale is not None and scale.requires_grad and torch.is_grad_enabled()
    out, _ = _head_affine_op(z, head_index, scale, offset, save_selected, backend, adapter_index, check_adapter_index,
                             check_head_index)
    return out
