"""The LoFiT head transform as a registered torch op, with its plain PyTorch implementation.

    z'_h = (1 + scale_k) * z_h + offset_k   for h = head_index[k];   z'_h = z_h for other heads

`z` is the input of one layer's `o_proj`, (..., num_heads * head_dim). `scale` and `offset` are
(K, head_dim), usually fp32 master weights; either may be None. Two backends compute the op:
"triton" (the fused kernels in `lofit_fast.kernels`) and "torch" (this file: the CPU path and the
test oracle, exact in fp64). Both run behind one `torch.library.custom_op` with one autograd rule,
so `torch.compile(fullgraph=True)` sees a single opaque node and backward saves the same thing
either way: the selected heads' slice of z, and only when the scale needs a gradient.
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
    """(K, D) rows in slot order -> (H, D) rows in head order; only called when every head is selected."""
    return params.new_empty(params.shape).index_copy_(0, head_index, params)


def head_affine_torch_forward(z, head_index, scale, offset, save_selected):
    """Returns (z', z_selected): z_selected is the selected heads of z, (tokens, K, head_dim), when
    saved for the scale's gradient and fewer than all heads are selected, else an empty tensor."""
    head_dim = (scale if scale is not None else offset).shape[-1]
    compute = _compute_dtype(z.dtype)
    z_heads = z.unflatten(-1, (-1, head_dim))
    empty = z.new_empty((0,))
    if _saves_input(z, head_index, head_dim):
        # Every head: one dense multiply-add over z, no gather or scatter.
        multiplier = 1 + _by_head(scale.to(compute), head_index) if scale is not None else None
        shift = _by_head(offset.to(compute), head_index) if offset is not None else None
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
        transformed = transformed * (1 + scale.to(compute))
    if offset is not None:
        transformed = transformed + offset.to(compute)
    out = z_heads.clone(memory_format=torch.contiguous_format)
    out.index_copy_(-2, head_index, transformed.to(z.dtype))
    z_selected = selected.reshape(-1, head_index.numel(), head_dim) if save_selected and scale is not None else empty
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


def head_affine_torch_backward(grad_out, saved, head_index, scale, head_dim,
                               need_grad_z, need_grad_scale, need_grad_offset):
    """Returns (grad_z or None, grad_scale or None, grad_offset or None); grad_z is None when there is
    no scale (the gradient passes through unchanged) or when it is not needed. `saved` is z itself when
    every head is selected, else the selected heads of z in slot order (see the forward)."""
    compute = _compute_dtype(grad_out.dtype)
    g_heads = grad_out.unflatten(-1, (-1, head_dim))
    grad_scale = grad_offset = grad_z = None
    if _saves_input(grad_out, head_index, head_dim):
        g_rows = g_heads.reshape(-1, head_index.numel(), head_dim)
        if need_grad_scale and scale is not None:
            z_rows = saved.unflatten(-1, (-1, head_dim)).reshape(g_rows.shape)
            grad_scale = _token_sum_of_products(g_rows, z_rows, compute).index_select(0, head_index)
        if need_grad_offset:
            grad_offset = g_rows.sum(0, dtype=compute).index_select(0, head_index)
        if need_grad_z and scale is not None:
            multiplier = 1 + _by_head(scale.to(compute), head_index)
            grad_z = (g_heads.to(compute) * multiplier).to(grad_out.dtype).flatten(-2).contiguous()
        return grad_z, grad_scale, grad_offset
    g_selected = g_heads.index_select(-2, head_index).to(compute)
    g_rows = g_selected.reshape(-1, head_index.numel(), head_dim)
    if need_grad_scale and scale is not None:
        grad_scale = _token_sum_of_products(g_rows, saved, compute)
    if need_grad_offset:
        grad_offset = g_rows.sum(0)
    if need_grad_z and scale is not None:
        grad_z = g_heads.clone(memory_format=torch.contiguous_format)
        grad_z.index_copy_(-2, head_index, (g_selected * (1 + scale.to(compute))).to(grad_out.dtype))
        grad_z = grad_z.flatten(-2)
    return grad_z, grad_scale, grad_offset


def head_affine_reference(z, head_index, scale=None, offset=None):
    """The transform written out head by head: short enough to check by eye, differentiable by autograd.
    Tests run it in fp64 as the oracle for both backends."""
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

@torch.library.custom_op("lofit_fast::head_affine", mutates_args=())
def _head_affine_op(z: Tensor, head_index: Tensor, scale: Optional[Tensor], offset: Optional[Tensor],
                    save_selected: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return _kernels().head_affine_forward(z, head_index, scale, offset, save_selected)
    return head_affine_torch_forward(z, head_index, scale, offset, save_selected)


@_head_affine_op.register_fake
def _(z, head_index, scale, offset, save_selected, backend):
    head_dim = (scale if scale is not None else offset).shape[-1]
    num_tokens = z.numel() // z.shape[-1]
    copies = save_selected and scale is not None and not _saves_input(z, head_index, head_dim)
    saved_shape = (num_tokens, head_index.shape[0], head_dim) if copies else (0,)
    return z.new_empty(z.shape), z.new_empty(saved_shape)


@torch.library.custom_op("lofit_fast::head_affine_backward", mutates_args=())
def _head_affine_backward_op(grad_out: Tensor, saved: Tensor, head_index: Tensor,
                             scale: Optional[Tensor], head_dim: int, need_grad_z: bool,
                             need_grad_scale: bool, need_grad_offset: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Custom ops return no None, so a gradient that is not computed comes back as an empty tensor."""
    implementation = _kernels().head_affine_backward if backend == "triton" else head_affine_torch_backward
    grads = implementation(grad_out, saved, head_index, scale, head_dim,
                           need_grad_z, need_grad_scale, need_grad_offset)
    return tuple(grad_out.new_empty((0,)) if grad is None else grad for grad in grads)


@_head_affine_backward_op.register_fake
def _(grad_out, saved, head_index, scale, head_dim, need_grad_z, need_grad_scale, need_grad_offset,
      backend):
    # A fresh tensor per output: returning one object twice tells the tracer the outputs alias, and
    # AOTAutograd then hands the offset's gradient to the scale as well.
    def empty():
        return grad_out.new_empty((0,))

    def param_grad():
        return grad_out.new_empty((head_index.shape[0], head_dim), dtype=_compute_dtype(grad_out.dtype))

    grad_z = grad_out.new_empty(grad_out.shape) if need_grad_z and scale is not None else empty()
    return (grad_z, param_grad() if need_grad_scale and scale is not None else empty(),
            param_grad() if need_grad_offset else empty())


def _setup_context(ctx, inputs, output):
    z, head_index, scale, offset, save_selected, backend = inputs
    ctx.head_dim = (scale if scale is not None else offset).shape[-1]
    saves_input = save_selected and scale is not None and _saves_input(z, head_index, ctx.head_dim)
    ctx.save_for_backward(z if saves_input else output[1], head_index, scale)
    ctx.backend = backend
    # z_selected is an output only so that it can be saved: its gradient is always None, and
    # materialising it would fill a (tokens, K, head_dim) tensor of zeros on every backward.
    ctx.set_materialize_grads(False)
    ctx.scale_dtype = scale.dtype if scale is not None else None
    ctx.offset_dtype = offset.dtype if offset is not None else None


def _backward(ctx, grad_out, _grad_z_selected):
    saved, head_index, scale = ctx.saved_tensors
    need_grad_z, _, need_grad_scale, need_grad_offset = ctx.needs_input_grad[:4]
    if grad_out is None:  # z' did not reach the loss (grads are not materialised, see _setup_context)
        return None, None, None, None, None, None
    if need_grad_scale and saved.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError("lofit_fast::head_affine was called with save_selected=False, but the scale "
                           "needs a gradient; call lofit_fast.ops.head_affine, which sets it")
    grad_z, grad_scale, grad_offset = _head_affine_backward_op(
        grad_out, saved, head_index, scale, ctx.head_dim,
        need_grad_z, need_grad_scale, need_grad_offset, ctx.backend)
    if need_grad_z and scale is None:
        grad_z = grad_out  # the transform is a shift: its gradient passes through unchanged
    return (grad_z if need_grad_z else None, None,
            grad_scale.to(ctx.scale_dtype) if need_grad_scale else None,
            grad_offset.to(ctx.offset_dtype) if need_grad_offset else None, None, None)


_head_affine_op.register_autograd(_backward, setup_context=_setup_context)


def head_affine(z: Tensor, head_index: Tensor, scale: Optional[Tensor] = None,
                offset: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Apply `z'_h = (1 + scale) * z_h + offset` to the heads in `head_index` (see the module doc).

    `backend` is "auto" (Triton for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1; torch
    otherwise), "torch" or "triton".
    """
    if scale is None and offset is None:
        raise ValueError("head_affine needs a scale, an offset or both; both are None")
    backend = resolve_backend(backend, z.device, z.dtype)
    # Only a scale that is being trained needs the selected heads of z saved for backward.
    save_selected = scale is not None and scale.requires_grad and torch.is_grad_enabled()
    out, _ = _head_affine_op(z, head_index, scale, offset, save_selected, backend)
    return out
