"""Triton kernels for the LoFiT head transform of one layer.

    z'_h = (1 + A_h) * z_h + v_h   for the selected heads h, z'_h = z_h for the others

`z` is the input of `o_proj`, viewed as (batch, tokens, num_heads * head_dim). `head_index[k]` is the
head that slot `k` of `scale` / `offset` (each (K, head_dim), fp32) belongs to.

Many adapters in one batch (ROUTED): `scale` / `offset` are (A, K, head_dim) and `adapter_index` (B,) names
the adapter of each row of z along dim 0 (-1: none, the row is copied unchanged). The same two kernels run
with the constexpr ROUTED; without it they do the work they did before (to the backward, all tokens are one
row, cut into chunks as before).

Why the kernels look like this:
- The op is out of place. `z` is usually the freshly made `.contiguous()` output of attention, but
  with some attention implementations it is a view of a tensor that attention saved for its own
  backward, so writing into it would corrupt that. The copy of unselected heads is the only work
  on them, and it is fused into the same single pass that transforms the selected heads.
- Forward grid (token blocks, heads): each program reads its (BLOCK_T, head_dim) tile of z once and
  writes it once. When the scale is trained, the selected heads' tiles are also written to
  `z_selected` (tokens, K, head_dim): the only activation backward needs, K/H of z instead of all.
- Backward with a scale, grid (token programs, heads): one pass over g writes grad_z (g scaled on
  the selected heads, copied elsewhere) and, for selected heads, fp32 sums of g * z and g over the
  program's token range.
- Backward without a scale: grad_z is g itself (the caller returns it, no pass), and the grid
  (token programs, K) reads only the selected heads' columns of g to sum them.
- Reductions are deterministic: every program owns a fixed token range and writes one fp32 partial
  row per slot; the host sums the (programs, K, head_dim) partials with one `sum(0)`. No atomics.
- Routed forward: each token loads its row's adapter and gathers its (BLOCK_T, head_dim) scale / offset
  rows (rows of one batch row hit the same cache lines); tokens of rows with -1 keep z.
- Routed backward: a program's token range is a chunk of one batch row, never two, so its partial
  sums belong to one adapter and its grad_z multiplier is one row of scale. The launcher returns the
  sums per batch row, (B, K, head_dim); `lofit_fast.ops` reduces rows to adapters (same code for both
  backends).
- Everything is computed in fp32 and cast on store (bf16 math is also wrong under the interpreter).
- Compiled for a GPU, both kernels are autotuned (tile height BLOCK_T, num_warps, num_stages) per shape;
  under TRITON_INTERPRET=1 they run one fixed config (see "Launch configurations").
"""

import os

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# `triton.jit` chose between compiling and interpreting when this module was imported; so does this.
_knobs = getattr(triton, "knobs", None)
_INTERPRETED = bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"

# Under the interpreter: one config, since autotuning would run every config on the CPU. A tile of 64 tokens x
# head_dim columns per program (64 x 128 fp32 is 32 KB of registers on a GPU).
_INTERPRETER_BLOCK_T = 64

# Compiled: the autotuner times these once per key (a token-count bucket, head_dim, K, the heads and flags, and
# the tensors' dtypes) and keeps the fastest. The forward kernel has no loop, so num_stages cannot matter
# there; the backward kernel loops over its token range, where software pipelining can.
_FORWARD_CONFIGS = [triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=1)
                    for block_t in (16, 32, 64, 128) for warps in (2, 4, 8)]
_BACKWARD_CONFIGS = [triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=stages)
                     for block_t in (32, 64, 128) for warps in (4, 8) for stages in (1, 2, 3)]

# Backward splits the tokens into ranges of a whole number of this many tokens, one range per program. It is
# a multiple of every BLOCK_T that can run (the largest tuned one, or the interpreter's), so the number of
# programs, and with it the size of the (programs, K, head_dim) partial-sum buffers that the host allocates
# and reduces, is fixed before launch and no config can change it. The kernel masks at the end of its range,
# so correctness never depended on the alignment: it only keeps every tile but the last of a range full.
_TOKEN_ALIGN = _INTERPRETER_BLOCK_T if _INTERPRETED else max(config.kwargs["BLOCK_T"] for config in _BACKWARD_CONFIGS)
_MAX_TILE = 128 * 128  # elements of a (BLOCK_T, BLOCK_D) fp32 tile held by one program
_MAX_PER_THREAD = 128  # of its elements per thread, beyond which registers spill


def _tokens_bucket(num_tokens: int) -> int:
    """The autotuning key for the token count: the next power of two, capped, so that a new sequence length
    does not mean a new round of tuning."""
    return min(triton.next_power_of_2(max(num_tokens, 1)), 1 << 16)


def _prune_tiles(configs, named_args, **kwargs):
    """The configs worth timing for this shape: a tile of at most `_MAX_TILE` elements and at most
    `_MAX_PER_THREAD` per thread, no taller than the token bucket (decoding has a few tokens). When none is
    left, the configs of the smallest tile."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    tokens = named_args.get("tokens_bucket", kwargs.get("tokens_bucket"))

    def fits(config):
        block_t = config.kwargs["BLOCK_T"]
        elements = block_t * block_d
        return elements <= _MAX_TILE and elements <= _MAX_PER_THREAD * 32 * config.num_warps and block_t <= tokens

    kept = [config for config in configs if fits(config)]
    if kept:
        return kept
    smallest = min(config.kwargs["BLOCK_T"] for config in configs)
    return [config for config in configs if config.kwargs["BLOCK_T"] == smallest]


def _autotuned(configs, key):
    """`triton.autotune` over `configs` when the kernel is compiled; the plain kernel under the interpreter."""
    if _INTERPRETED:
        return lambda kernel: kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_tiles})


def _launch(kernel, grid, *args, **kwargs):
    """Launch with a `grid(meta)` callable; under the interpreter with its fixed BLOCK_T."""
    if _INTERPRETED:
        kernel[grid({"BLOCK_T": _INTERPRETER_BLOCK_T})](*args, BLOCK_T=_INTERPRETER_BLOCK_T, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@triton.jit
def _slot_of_head(head_index_ptr, num_selected, head, BLOCK_K: tl.constexpr):
    """The slot that `head` occupies in `head_index`, or -1 when the head is not selected."""
    slots = tl.arange(0, BLOCK_K)
    heads = tl.load(head_index_ptr + slots, mask=slots < num_selected, other=-1)
    return tl.max(tl.where(heads == head, slots, -1), axis=0)


@_autotuned(_FORWARD_CONFIGS, key=["tokens_bucket", "num_selected", "HEAD_DIM", "NUM_HEADS",
                                    "HAS_SCALE", "HAS_OFFSET", "SAVE_SELECTED", "ROUTED"])
@triton.jit
def _head_affine_forward_kernel(
    z_ptr, out_ptr, z_selected_ptr, head_index_ptr, scale_ptr, offset_ptr, adapter_index_ptr,
    num_tokens, seq_len, tokens_per_row, num_selected, tokens_bucket,
    stride_zb, stride_zt, stride_zc,
    HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_OFFSET: tl.constexpr, SAVE_SELECTED: tl.constexpr, ROUTED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    slot = _slot_of_head(head_index_ptr, num_selected, head, BLOCK_K)

    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    col_mask = cols < HEAD_DIM
    mask = token_mask[:, None] & col_mask[None, :]
    # (batch, token) strides are kept apart so that views like z[:, ::2] need no copy.
    z_rows = (tokens // seq_len) * stride_zb + (tokens % seq_len) * stride_zt
    z_offsets = z_rows[:, None] + (head * HEAD_DIM + cols)[None, :] * stride_zc
    out_offsets = tokens[:, None] * (NUM_HEADS * HEAD_DIM) + (head * HEAD_DIM + cols)[None, :]

    z = tl.load(z_ptr + z_offsets, mask=mask, other=0.0)
    if slot >= 0:
        y = z.to(tl.float32)
        if ROUTED:
            # Each token's adapter (its batch row's), then a 2D gather of that adapter's row of the slot.
            adapter = tl.load(adapter_index_ptr + tokens // tokens_per_row, mask=token_mask, other=-1)
            routed = adapter >= 0
            param_offsets = ((adapter * num_selected + slot) * HEAD_DIM)[:, None] + cols[None, :]
            param_mask = routed[:, None] & col_mask[None, :]
        if HAS_SCALE:
            if ROUTED:
                a = tl.load(scale_ptr + param_offsets, mask=param_mask, other=0.0).to(tl.float32)
                y = y * (1.0 + a)
            else:
                a = tl.load(scale_ptr + slot * HEAD_DIM + cols, mask=col_mask, other=0.0).to(tl.float32)
                y = y * (1.0 + a[None, :])
            if SAVE_SELECTED:
                saved_offsets = tokens[:, None] * (num_selected * HEAD_DIM) + (slot * HEAD_DIM + cols)[None, :]
                tl.store(z_selected_ptr + saved_offsets, z, mask=mask)
        if HAS_OFFSET:
            if ROUTED:
                v = tl.load(offset_ptr + param_offsets, mask=param_mask, other=0.0).to(tl.float32)
                y = y + v
            else:
                v = tl.load(offset_ptr + slot * HEAD_DIM + cols, mask=col_mask, other=0.0).to(tl.float32)
                y = y + v[None, :]
        if ROUTED:
            # Rows without an adapter keep z bit for bit (y + 0.0 would turn -0.0 into 0.0).
            y = tl.where(routed[:, None], y, z.to(tl.float32))
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_offsets, z, mask=mask)


@_autotuned(_BACKWARD_CONFIGS, key=["tokens_bucket", "num_selected", "HEAD_DIM", "NUM_HEADS", "SAVED_BY_HEAD",
                                     "HAS_SCALE", "WRITE_GRAD_Z", "NEED_GRAD_SCALE", "NEED_GRAD_OFFSET", "ROUTED"])
@triton.jit
def _head_affine_backward_kernel(
    grad_out_ptr, saved_ptr, grad_z_ptr, grad_scale_partial_ptr, grad_offset_partial_ptr,
    head_index_ptr, scale_ptr, adapter_index_ptr,
    seq_len, tokens_per_row, chunks_per_row, num_selected, tokens_per_program, tokens_bucket,
    stride_gb, stride_gt, stride_gc,
    stride_sb, stride_st, stride_sc,
    HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr, SAVED_BY_HEAD: tl.constexpr,
    HAS_SCALE: tl.constexpr, WRITE_GRAD_Z: tl.constexpr,
    NEED_GRAD_SCALE: tl.constexpr, NEED_GRAD_OFFSET: tl.constexpr, ROUTED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    # With WRITE_GRAD_Z every head needs its grad_z tile written, so axis 1 walks heads; otherwise
    # only the selected heads' columns are read, so axis 1 walks slots.
    if WRITE_GRAD_Z:
        head = tl.program_id(1)
        slot = _slot_of_head(head_index_ptr, num_selected, head, BLOCK_K)
    else:
        slot = tl.program_id(1)
        head = tl.load(head_index_ptr + slot).to(tl.int32)

    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < HEAD_DIM
    # Program pid_t covers chunk (pid_t % chunks_per_row) of batch row (pid_t // chunks_per_row), clipped to
    # that row. Without ROUTED the launcher passes one row of all tokens, cut into chunks_per_row chunks.
    row = pid_t // chunks_per_row
    first_token = row * tokens_per_row + (pid_t % chunks_per_row) * tokens_per_program
    last_token = tl.minimum(first_token + tokens_per_program, (row + 1) * tokens_per_row)

    if slot >= 0:
        multiplier = tl.full((BLOCK_D,), 1.0, tl.float32)
        if HAS_SCALE:
            if ROUTED:
                # One batch row, so one adapter: its row of the slot, none (multiplier 1) for index -1.
                # The adapter broadcast over the columns: Triton's interpreter rejects a scalar & vector mask.
                adapter = tl.load(adapter_index_ptr + row) + tl.zeros((BLOCK_D,), tl.int32)
                param_offsets = (adapter * num_selected + slot) * HEAD_DIM + cols
                multiplier += tl.load(scale_ptr + param_offsets, mask=col_mask & (adapter >= 0),
                                      other=0.0).to(tl.float32)
            else:
                multiplier += tl.load(scale_ptr + slot * HEAD_DIM + cols, mask=col_mask, other=0.0).to(tl.float32)
        sum_gz = tl.zeros((BLOCK_D,), tl.float32)
        sum_g = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(first_token, last_token, BLOCK_T):
            tokens = start + tl.arange(0, BLOCK_T)
            mask = (tokens < last_token)[:, None] & col_mask[None, :]
            g_rows = (tokens // seq_len) * stride_gb + (tokens % seq_len) * stride_gt
            g_offsets = g_rows[:, None] + (head * HEAD_DIM + cols)[None, :] * stride_gc
            g = tl.load(grad_out_ptr + g_offsets, mask=mask, other=0.0).to(tl.float32)
            if WRITE_GRAD_Z:
                out_offsets = tokens[:, None] * (NUM_HEADS * HEAD_DIM) + (head * HEAD_DIM + cols)[None, :]
                grad_z = g * multiplier[None, :]
                tl.store(grad_z_ptr + out_offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
            if NEED_GRAD_SCALE:
                # The saved activation is z itself (all heads selected, head order) or the selected heads.
                saved_rows = (tokens // seq_len) * stride_sb + (tokens % seq_len) * stride_st
                if SAVED_BY_HEAD:
                    saved_cols = head * HEAD_DIM + cols
                else:
                    saved_cols = slot * HEAD_DIM + cols
                saved_offsets = saved_rows[:, None] + saved_cols[None, :] * stride_sc
                z = tl.load(saved_ptr + saved_offsets, mask=mask, other=0.0).to(tl.float32)
                sum_gz += tl.sum(g * z, axis=0)
            if NEED_GRAD_OFFSET:
                sum_g += tl.sum(g, axis=0)
        partial_offsets = (pid_t * num_selected + slot) * HEAD_DIM + cols
        if NEED_GRAD_SCALE:
            tl.store(grad_scale_partial_ptr + partial_offsets, sum_gz, mask=col_mask)
        if NEED_GRAD_OFFSET:
            tl.store(grad_offset_partial_ptr + partial_offsets, sum_g, mask=col_mask)
    else:
        for start in range(first_token, last_token, BLOCK_T):
            tokens = start + tl.arange(0, BLOCK_T)
            mask = (tokens < last_token)[:, None] & col_mask[None, :]
            g_rows = (tokens // seq_len) * stride_gb + (tokens % seq_len) * stride_gt
            g_offsets = g_rows[:, None] + (head * HEAD_DIM + cols)[None, :] * stride_gc
            out_offsets = tokens[:, None] * (NUM_HEADS * HEAD_DIM) + (head * HEAD_DIM + cols)[None, :]
            g = tl.load(grad_out_ptr + g_offsets, mask=mask, other=0.0)
            tl.store(grad_z_ptr + out_offsets, g, mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, channels) view of x; leading dims beyond two are merged (a copy only if needed)."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _token_programs(num_tokens: int, num_columns: int, device: torch.device) -> int:
    """How many programs split the token axis in backward: enough to fill the device a few times over,
    few enough that the (programs, K, head_dim) partial sums stay small."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    blocks = triton.cdiv(num_tokens, _TOKEN_ALIGN)
    return max(1, min(blocks, triton.cdiv(target, num_columns)))


def _contiguous(params):
    """The kernels index scale / offset as dense (..., K, head_dim) rows."""
    return params.contiguous() if params is not None else None


def head_affine_forward(z, head_index, scale, offset, save_selected, adapter_index=None):
    """Returns (z', z_selected); z_selected is (tokens, K, head_dim) when saved, else empty.

    With `adapter_index` (B,) for z of shape (B, ..., C), scale / offset are (A, K, head_dim) and row b uses
    adapter adapter_index[b], none for -1 (the caller has checked the range)."""
    head_dim = (scale if scale is not None else offset).shape[-1]
    num_heads = z.shape[-1] // head_dim
    num_selected = head_index.numel()
    z3 = _as_3d(z)
    num_tokens = z3.shape[0] * z3.shape[1]
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    # With every head selected, autograd saves z itself instead (see lofit_fast.ops).
    save_selected = save_selected and scale is not None and num_selected < num_heads
    z_selected = z.new_empty((num_tokens, num_selected, head_dim) if save_selected else (0,))
    if num_tokens == 0:
        return out, z_selected
    routed = adapter_index is not None
    # Batch rows are z's dim 0, whatever _as_3d merged: token t (flattened) is in row t // tokens_per_row.
    tokens_per_row = num_tokens // adapter_index.numel() if routed else 1
    _launch(
        _head_affine_forward_kernel, lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), num_heads),
        z3, out, z_selected, head_index, _contiguous(scale), _contiguous(offset), adapter_index,
        num_tokens, max(z3.shape[1], 1), tokens_per_row, num_selected, _tokens_bucket(num_tokens),
        z3.stride(0), z3.stride(1), z3.stride(2),
        HEAD_DIM=head_dim, NUM_HEADS=num_heads,
        HAS_SCALE=scale is not None, HAS_OFFSET=offset is not None, SAVE_SELECTED=save_selected, ROUTED=routed,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_K=triton.next_power_of_2(num_selected),
    )
    return out, z_selected


def head_affine_backward(grad_out, saved, head_index, scale, head_dim,
                         need_grad_z, need_grad_scale, need_grad_offset, adapter_index=None):
    """Returns (grad_z or None, grad_scale or None, grad_offset or None).

    `saved` is z itself when every head is selected, else z_selected from the forward (slot order).

    grad_z is None when there is no scale (the gradient then passes through unchanged and the caller
    hands grad_out on as it is) or when it is not needed (z of the lowest patched layer).

    With `adapter_index` (B,), grad_scale / grad_offset are the sums per batch row, (B, K, head_dim), which
    `lofit_fast.ops` reduces to the adapters.
    """
    num_heads = grad_out.shape[-1] // head_dim
    num_selected = head_index.numel()
    g3 = _as_3d(grad_out)
    num_tokens = g3.shape[0] * g3.shape[1]
    write_grad_z = need_grad_z and scale is not None
    need_grad_scale = need_grad_scale and scale is not None
    if not (write_grad_z or need_grad_scale or need_grad_offset):
        return None, None, None
    saved_by_head = num_selected == num_heads
    if need_grad_scale:
        # Index the saved activation with grad_out's (batch, token) layout; z_selected is (tokens, K, D).
        s3 = _as_3d(saved) if saved_by_head else saved.view(g3.shape[0], g3.shape[1], num_selected * head_dim)
        saved_strides = (s3.stride(0), s3.stride(1), s3.stride(2))
    else:
        s3, saved_strides = saved, (0, 0, 0)
    num_columns = num_heads if write_grad_z else num_selected
    routed = adapter_index is not None
    # Without routing all tokens form one row. Routed, the rows are grad_out's dim 0 and no program's range may
    # cross from one row into the next: its sums and its scale row belong to that row's adapter.
    num_rows = adapter_index.numel() if routed else 1
    tokens_per_row = num_tokens // num_rows if num_rows else 0
    programs = _token_programs(num_tokens, num_columns, grad_out.device)
    # A whole number of _TOKEN_ALIGN tokens, whatever BLOCK_T the autotuner picks; at least one, so that zero
    # tokens give one (empty) program rather than a division by zero. Routed, the last chunk of each row is
    # clipped to the row, so its last tile may be partial: the kernel masks it.
    tokens_per_program = max(1, triton.cdiv(triton.cdiv(num_tokens, programs), _TOKEN_ALIGN)) * _TOKEN_ALIGN
    chunks_per_row = max(1, triton.cdiv(tokens_per_row, tokens_per_program))
    programs = num_rows * chunks_per_row
    # The autotuning key: the tokens one program walks (routed decoding has one per row, not B).
    tokens_bucket = _tokens_bucket(min(tokens_per_row, tokens_per_program) if routed else num_tokens)

    grad_z = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device) if write_grad_z else None
    partial_shape = (programs, num_selected, head_dim)
    f32 = dict(dtype=torch.float32, device=grad_out.device)
    grad_scale_partial = torch.empty(partial_shape, **f32) if need_grad_scale else None
    grad_offset_partial = torch.empty(partial_shape, **f32) if need_grad_offset else None
    # Programs with no tokens (possible only when num_tokens == 0) write nothing: zero-fill then.
    if num_tokens == 0:
        for partial in (grad_scale_partial, grad_offset_partial):
            if partial is not None:
                partial.zero_()
    else:
        # The grid does not depend on the config (see _TOKEN_ALIGN): the partial buffers above fit any of them.
        _launch(
            _head_affine_backward_kernel, lambda meta: (programs, num_columns),
            g3, s3, grad_z, grad_scale_partial, grad_offset_partial,
            head_index, _contiguous(scale), adapter_index,
            max(g3.shape[1], 1), tokens_per_row, chunks_per_row, num_selected, tokens_per_program, tokens_bucket,
            g3.stride(0), g3.stride(1), g3.stride(2),
            *saved_strides,
            HEAD_DIM=head_dim, NUM_HEADS=num_heads, SAVED_BY_HEAD=saved_by_head,
            HAS_SCALE=scale is not None, WRITE_GRAD_Z=write_grad_z,
            NEED_GRAD_SCALE=need_grad_scale, NEED_GRAD_OFFSET=need_grad_offset, ROUTED=routed,
            BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_K=triton.next_power_of_2(num_selected),
        )

    def total(partial):
        """Sum of the programs' partials: over all of them, or routed, over each row's chunks."""
        if routed:
            return partial.view(num_rows, chunks_per_row, num_selected, head_dim).sum(1)
        return partial.sum(0)

    grad_scale = total(grad_scale_partial) if need_grad_scale else None
    grad_offset = total(grad_offset_partial) if need_grad_offset else None
    return grad_z, grad_scale, grad_offset
