"""Triton kernels for the LoFiT head transform of one layer, and their host launchers.

    z'_h = (1 + A_h) * z_h + v_h   for the selected heads h, z'_h = z_h for the others

`z` is the input of `o_proj`, viewed as (batch, tokens, num_heads * head_dim). `head_index[k]` is the
head that slot `k` of `scale` / `offset` (each (K, head_dim), fp32) belongs to. Routed (many adapters in one
batch): `scale` / `offset` are (A, K, head_dim) and `adapter_index` (B,) names each row's adapter (-1: none).

`head_affine_forward` / `head_affine_backward` are the launchers of the mode Triton was imported in (compiled,
or TRITON_INTERPRET=1); `HeadAffineKernels(interpreted, compile_only)` builds either mode, and `compile_only=True`
is how `lofit_fast.kernels.cross_compile` compiles them for CUDA targets without a GPU. Why the kernels look as
they do (out of place, the grids, no atomics, int64 offsets, fp32 math): kernels/README.md.
"""

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Plain functions: HeadAffineKernels makes them Triton kernels (compiled or interpreted), so that one process
# can hold both. They call no other @jit function, which a kernel of the other mode could not call.

def _head_affine_forward_kernel(
    z_ptr, out_ptr, z_selected_ptr, head_index_ptr, scale_ptr, offset_ptr, adapter_index_ptr,
    num_tokens, seq_len, tokens_per_row, num_selected, num_adapters, tokens_bucket,
    stride_zb, stride_zt, stride_zc,
    HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_OFFSET: tl.constexpr, SAVE_SELECTED: tl.constexpr, ROUTED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    col_mask = cols < HEAD_DIM
    mask = token_mask[:, None] & col_mask[None, :]
    # (batch, token) strides are kept apart so that views like z[:, ::2] need no copy; the launcher passes
    # seq_len == 1 when the rows are evenly spaced, which Triton specializes and folds away.
    batch = tokens // seq_len
    z_rows = batch.to(tl.int64) * stride_zb + (tokens - batch * seq_len).to(tl.int64) * stride_zt
    z_offsets = z_rows[:, None] + ((head * HEAD_DIM + cols).to(tl.int64) * stride_zc)[None, :]
    out_offsets = tokens.to(tl.int64)[:, None] * (NUM_HEADS * HEAD_DIM) + (head * HEAD_DIM + cols)[None, :]
    z = tl.load(z_ptr + z_offsets, mask=mask, other=0.0)

    # The slot of this head in head_index, -1 when it is not selected: the program's only reduction.
    slots = tl.arange(0, BLOCK_K)
    heads = tl.load(head_index_ptr + slots, mask=slots < num_selected, other=-1)
    slot = tl.max(tl.where(heads == head, slots, -1), axis=0)
    if slot >= 0:
        y = z.to(tl.float32)
        if ROUTED:
            # Each token's adapter (its batch row's), then a 2D gather of that adapter's row of the slot. An index
            # outside [0, num_adapters) reads nothing and leaves the token unchanged, like -1.
            adapter = tl.load(adapter_index_ptr + tokens // tokens_per_row, mask=token_mask, other=-1)
            routed = (adapter >= 0) & (adapter < num_adapters)
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
                saved_offsets = (tokens.to(tl.int64)[:, None] * (num_selected * HEAD_DIM)
                                 + (slot * HEAD_DIM + cols)[None, :])
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


def _head_affine_backward_kernel(
    grad_out_ptr, saved_ptr, grad_z_ptr, grad_scale_partial_ptr, grad_offset_partial_ptr,
    head_index_ptr, scale_ptr, adapter_index_ptr,
    seq_len, tokens_per_row, chunks_per_row, tokens_per_program, num_selected, num_adapters,
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
        slots = tl.arange(0, BLOCK_K)
        heads = tl.load(head_index_ptr + slots, mask=slots < num_selected, other=-1)
        slot = tl.max(tl.where(heads == head, slots, -1), axis=0)
    else:
        slot = tl.program_id(1)
        head = tl.load(head_index_ptr + slot).to(tl.int32)

    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < HEAD_DIM
    g_cols = ((head * HEAD_DIM + cols).to(tl.int64) * stride_gc)[None, :]
    out_cols = (head * HEAD_DIM + cols)[None, :]
    # Program pid_t covers chunk (pid_t % chunks_per_row) of batch row (pid_t // chunks_per_row), clipped to
    # that row. Without ROUTED the launcher passes one row of all tokens.
    row = pid_t // chunks_per_row
    first_token = row * tokens_per_row + (pid_t % chunks_per_row) * tokens_per_program
    last_token = tl.minimum(first_token + tokens_per_program, (row + 1) * tokens_per_row)

    if slot >= 0:
        multiplier = tl.full((BLOCK_D,), 1.0, tl.float32)
        if HAS_SCALE:
            if ROUTED:
                # One batch row, so one adapter: its row of the slot, none (multiplier 1) for index -1 (or one
                # outside [0, num_adapters)). The adapter is broadcast over the columns: Triton's interpreter
                # rejects a scalar & vector mask.
                adapter = tl.load(adapter_index_ptr + row) + tl.zeros((BLOCK_D,), tl.int32)
                param_offsets = (adapter * num_selected + slot) * HEAD_DIM + cols
                use = col_mask & (adapter >= 0) & (adapter < num_adapters)
                multiplier += tl.load(scale_ptr + param_offsets, mask=use, other=0.0).to(tl.float32)
            else:
                multiplier += tl.load(scale_ptr + slot * HEAD_DIM + cols, mask=col_mask, other=0.0).to(tl.float32)
        # Token sums accumulate elementwise in 2D tiles and are reduced once, after the loop.
        sum_gz = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        sum_g = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for start in range(first_token, last_token, BLOCK_T):
            tokens = start + tl.arange(0, BLOCK_T)
            mask = (tokens < last_token)[:, None] & col_mask[None, :]
            batch = tokens // seq_len
            position = tokens - batch * seq_len
            g_rows = batch.to(tl.int64) * stride_gb + position.to(tl.int64) * stride_gt
            g = tl.load(grad_out_ptr + g_rows[:, None] + g_cols, mask=mask, other=0.0).to(tl.float32)
            if NEED_GRAD_SCALE:
                # The saved activation is z itself (all heads selected, head order) or the selected heads.
                saved_rows = batch.to(tl.int64) * stride_sb + position.to(tl.int64) * stride_st
                if SAVED_BY_HEAD:
                    saved_cols = head * HEAD_DIM + cols
                else:
                    saved_cols = slot * HEAD_DIM + cols
                saved_offsets = saved_rows[:, None] + (saved_cols.to(tl.int64) * stride_sc)[None, :]
                z = tl.load(saved_ptr + saved_offsets, mask=mask, other=0.0).to(tl.float32)
                sum_gz += g * z
            if NEED_GRAD_OFFSET:
                sum_g += g
            if WRITE_GRAD_Z:
                out_offsets = tokens.to(tl.int64)[:, None] * (NUM_HEADS * HEAD_DIM) + out_cols
                grad_z = g * multiplier[None, :]
                tl.store(grad_z_ptr + out_offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
        # The partial rows are indexed by the grid's column (head or slot), not by the slot: both program ids are
        # at hand after the loop, where a slot found by the lookup would have to be kept alive across it.
        partial_offsets = (pid_t.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * HEAD_DIM + cols
        if NEED_GRAD_SCALE and NEED_GRAD_OFFSET:
            # Both sums in one reduction: a (BLOCK_T, BLOCK_D, 2) tile summed over tokens.
            sums = tl.sum(tl.join(sum_gz, sum_g), axis=0)
            total_gz, total_g = tl.split(sums)
            tl.store(grad_scale_partial_ptr + partial_offsets, total_gz, mask=col_mask)
            tl.store(grad_offset_partial_ptr + partial_offsets, total_g, mask=col_mask)
        elif NEED_GRAD_SCALE:
            tl.store(grad_scale_partial_ptr + partial_offsets, tl.sum(sum_gz, axis=0), mask=col_mask)
        elif NEED_GRAD_OFFSET:
            tl.store(grad_offset_partial_ptr + partial_offsets, tl.sum(sum_g, axis=0), mask=col_mask)
    elif WRITE_GRAD_Z:
        # An unselected head: grad_z is g, copied tile by tile in its own dtype.
        for start in range(first_token, last_token, BLOCK_T):
            tokens = start + tl.arange(0, BLOCK_T)
            mask = (tokens < last_token)[:, None] & col_mask[None, :]
            batch = tokens // seq_len
            g_rows = batch.to(tl.int64) * stride_gb + (tokens - batch * seq_len).to(tl.int64) * stride_gt
            g = tl.load(grad_out_ptr + g_rows[:, None] + g_cols, mask=mask, other=0.0)
            out_offsets = tokens.to(tl.int64)[:, None] * (NUM_HEADS * HEAD_DIM) + out_cols
            tl.store(grad_z_ptr + out_offsets, g, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# Compiled, the kernels are autotuned over these configs: the tile height BLOCK_T and the warps. Neither kernel
# has a loop whose loads feed a tl.dot, the only loads Triton software-pipelines, so num_stages changes nothing
# and stays 1. The pruning (below) keeps the ones whose tile fits the registers without spilling and is wide
# enough per thread for 128-bit accesses.
_FORWARD_CONFIGS = [triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=1)
                    for warps in (4, 8) for block_t in (8, 16, 32, 64, 128)]
_BACKWARD_CONFIGS = [triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=1)
                     for warps in (4, 8) for block_t in (8, 16, 32, 64)]
# Elements of a (BLOCK_T, BLOCK_D) tile per thread. At least 8, so that every thread can move 128 bits of a
# 16-bit row at once; at most 32 in forward (the tile and its fp32 copy) and 16 in backward (the tile of g,
# of z and the two fp32 sum tiles): more spills or starves the multiprocessor of resident programs.
_MIN_PER_THREAD = 8
_MAX_PER_THREAD = {"forward": 32, "backward": 16}


def _interpreter_block_t(kernel: str, tokens_bucket: int) -> int:
    """The tile height under the interpreter, where autotuning would run every config on the CPU. Forward: 64
    tokens, more for long inputs (16 programs per head at most, each program costs the interpreter a lot);
    backward: a quarter of the chunk, so that the loop over a chunk runs several times."""
    if kernel == "forward":
        return min(max(tokens_bucket // 16, 64), 1024)
    return max(16, tokens_bucket // 4)


# Backward cuts the tokens into chunks of a power of two, one chunk per program, aiming at this many programs per
# multiprocessor (several waves at any occupancy, so a ragged last wave costs little), with chunks of at least
# _MIN_CHUNK tokens (each chunk writes one fp32 partial row per selected head, which the host reads again) and at
# most _MAX_CHUNK (the autotuning key stays small).
_PROGRAMS_PER_MULTIPROCESSOR = 32
_MIN_CHUNK, _MAX_CHUNK = 16, 4096
_CPU_MULTIPROCESSORS = 2  # the interpreter's stand-in: a few programs per column
# The forward's autotuning key for the token count: the next power of two, capped (beyond it the grid is large
# whatever the count, and a new sequence length should not mean a new round of tuning).
_MAX_TOKENS_BUCKET = 1 << 14


def _tokens_bucket(num_tokens: int) -> int:
    """The forward's autotuning key for the token count (see _MAX_TOKENS_BUCKET)."""
    return min(triton.next_power_of_2(max(num_tokens, 1)), _MAX_TOKENS_BUCKET)


def kept_configs(kernel: str, configs, block_d: int, tokens_bucket: int) -> list:
    """The configs worth timing for one launch of `kernel` ("forward" or "backward"): between _MIN_PER_THREAD
    and _MAX_PER_THREAD[kernel] elements of the (BLOCK_T, BLOCK_D) tile per thread, no taller than the token
    bucket (decoding has a few tokens). When none is left, those of the smallest tile."""
    def per_thread(config):
        return config.kwargs["BLOCK_T"] * block_d // (32 * config.num_warps)

    kept = [config for config in configs if _MIN_PER_THREAD <= per_thread(config) <= _MAX_PER_THREAD[kernel]
            and config.kwargs["BLOCK_T"] <= tokens_bucket]
    if kept:
        return kept
    smallest = min(per_thread(config) for config in configs)
    return [config for config in configs if per_thread(config) == smallest]


def fixed_config(kept: list, block_d: int):
    """The config deterministic mode runs (no timing): the kept one nearest to 16 elements per thread, more warps
    first (a taller tile: more loads in flight per program). Bit-identical gradients run to run need one config:
    the order of the token sums depends on it."""
    def preference(config):
        per_thread = config.kwargs["BLOCK_T"] * block_d / (32 * config.num_warps)
        return abs(math.log2(per_thread / 16)), -config.num_warps, config.kwargs["BLOCK_T"]

    return min(kept, key=preference)


@functools.lru_cache(maxsize=None)
def _deterministic_config(kernel: str, block_d: int, tokens_bucket: int):
    """fixed_config of the kept configs of `kernel` for one launch shape, worked out once per shape (a launch
    otherwise spends microseconds of host time on it)."""
    configs = _FORWARD_CONFIGS if kernel == "forward" else _BACKWARD_CONFIGS
    return fixed_config(kept_configs(kernel, configs, block_d, tokens_bucket), block_d)


def deterministic() -> bool:
    """Whether launches use `fixed_config` instead of the autotuner: under
    `torch.use_deterministic_algorithms(True)` or with LOFIT_FAST_DETERMINISTIC=1."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("LOFIT_FAST_DETERMINISTIC") == "1"


def _autotune_options() -> dict:
    # Tuning results go to Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache), so a new process
    # does not time the configs again; `cache_results` arrived in Triton 3.2.
    import inspect

    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


_FORWARD_KEY = ["tokens_bucket", "HEAD_DIM", "NUM_HEADS", "HAS_SCALE", "HAS_OFFSET", "SAVE_SELECTED", "ROUTED"]
_BACKWARD_KEY = ["tokens_per_program", "HEAD_DIM", "NUM_HEADS", "SAVED_BY_HEAD", "HAS_SCALE", "WRITE_GRAD_Z",
                 "NEED_GRAD_SCALE", "NEED_GRAD_OFFSET", "ROUTED"]
# The keys leave out K: a layer with another number of selected heads reuses the tuned config (its BLOCK_K, a power
# of two, only means another compile). Triton adds the dtypes of the tensor arguments.


def _compiled_kernel(function, kernel: str, configs, key, tokens_name: str):
    def prune(configs, named_args, **kwargs):
        return kept_configs(kernel, configs, kwargs["BLOCK_D"], named_args[tokens_name])

    jitted = JITFunction(function, do_not_specialize=["tokens_bucket"] if kernel == "forward" else None)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           **_autotune_options())(jitted)


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


def _token_strides(*tensors3: torch.Tensor) -> tuple[int, list]:
    """(seq_len, [(batch stride, token stride, channel stride) of each tensor]) for indexing the flattened tokens
    of (batch, tokens, channels) tensors of one shape: token t is at batch t // seq_len, position t % seq_len.
    When every tensor's rows are evenly spaced (one batch row, or rows one after another) seq_len is 1 and each
    batch stride is the per-token stride: Triton specializes an argument equal to 1, so the kernels' division
    by seq_len costs nothing."""
    batch, seq, _ = tensors3[0].shape

    def evenly_spaced(x3):
        return seq == 1 or batch == 1 or x3.stride(0) == seq * x3.stride(1)

    if all(evenly_spaced(x3) for x3 in tensors3):
        return 1, [(x3.stride(1) if seq > 1 else x3.stride(0), 0, x3.stride(2)) for x3 in tensors3]
    return seq, [(x3.stride(0), x3.stride(1), x3.stride(2)) for x3 in tensors3]


def _check_token_count(num_tokens: int) -> None:
    if num_tokens >= 2**31:
        raise ValueError(f"{num_tokens} tokens in one call: the kernels index tokens with int32; split the batch "
                         f"into calls of fewer than 2^31 tokens")


def _tokens_per_program(tokens_per_row: int, num_rows: int, num_columns: int, multiprocessors: int) -> int:
    """Tokens of one backward chunk: a power of two, aiming at _PROGRAMS_PER_MULTIPROCESSOR programs per
    multiprocessor over the (rows * chunks, columns) grid, within [_MIN_CHUNK, _MAX_CHUNK] and never longer
    than a row needs."""
    chunks_wanted = max(1, triton.cdiv(_PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, max(num_columns, 1)))
    chunk = triton.next_power_of_2(max(1, triton.cdiv(num_rows * tokens_per_row, chunks_wanted)))
    chunk = min(max(chunk, _MIN_CHUNK), _MAX_CHUNK)
    return min(chunk, triton.next_power_of_2(max(tokens_per_row, 1)))


def _contiguous(params):
    """The kernels index scale / offset as dense (..., K, head_dim) rows."""
    return params.contiguous() if params is not None else None


class HeadAffineKernels:
    """The two kernels, made Triton kernels in one mode, and their host launchers.

    Args:
        interpreted: run the kernels in Triton's interpreter (CPU tensors, no autotuning) instead of compiling.
        compile_only: compiled kernels whose launches compile (autotuning, pruning and keys as they run) but run
            nothing; needs a Triton driver for the target (see `lofit_fast.kernels.cross_compile`). Each launch is
            appended to `self.compiled` as ("forward" or "backward", CompiledKernel, grid(meta) callable).
        multiprocessors: the device's multiprocessor count for sizing the backward grid; default: the CUDA
            device's, or a small stand-in on the CPU.
    """

    def __init__(self, interpreted: bool, compile_only: bool = False, multiprocessors: Optional[int] = None):
        if interpreted and compile_only:
            raise ValueError("compile_only needs compiled kernels, not interpreted ones")
        self.interpreted, self.compile_only, self.multiprocessors = interpreted, compile_only, multiprocessors
        if interpreted:
            self.forward_kernel = InterpretedFunction(_head_affine_forward_kernel)
            self.backward_kernel = InterpretedFunction(_head_affine_backward_kernel)
        else:
            self.forward_kernel = _compiled_kernel(_head_affine_forward_kernel, "forward", _FORWARD_CONFIGS,
                                                   _FORWARD_KEY, "tokens_bucket")
            self.backward_kernel = _compiled_kernel(_head_affine_backward_kernel, "backward", _BACKWARD_CONFIGS,
                                                    _BACKWARD_KEY, "tokens_per_program")
        self.compiled = []

    def _launch(self, name: str, grid, args: tuple, tokens_bucket: int, **constexprs):
        kernel = self.forward_kernel if name == "forward" else self.backward_kernel
        if self.interpreted:
            meta = dict(constexprs, BLOCK_T=_interpreter_block_t(name, tokens_bucket))
            kernel[grid(meta)](*args, **meta)
            return
        # Explicit, so that no Triton version's default decides whether y * (1 + a) + v rounds once or twice.
        constexprs["enable_fp_fusion"] = True
        if deterministic():
            config = _deterministic_config(name, constexprs["BLOCK_D"], tokens_bucket)
            kernel, constexprs = kernel.fn, dict(constexprs, **config.all_kwargs())
        if self.compile_only:
            self.compiled.append((name, kernel.run(*args, grid=grid, warmup=True, **constexprs), grid))
        else:
            kernel[grid](*args, **constexprs)

    def _multiprocessors(self, device: torch.device) -> int:
        if self.multiprocessors is not None:
            return self.multiprocessors
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return _CPU_MULTIPROCESSORS

    def forward(self, z, head_index, scale, offset, save_selected, adapter_index=None):
        """Returns (z', z_selected); z_selected is (tokens, K, head_dim) when saved, else empty.

        With `adapter_index` (B,) for z of shape (B, ..., C), scale / offset are (A, K, head_dim) and row b uses
        adapter adapter_index[b], none for -1 (an index outside [-1, A) is treated as -1; lofit_fast.ops
        checks the range unless told the route is validated)."""
        params = scale if scale is not None else offset
        head_dim = params.shape[-1]
        num_heads = z.shape[-1] // head_dim
        num_selected = head_index.numel()
        z3 = _as_3d(z)
        num_tokens = z3.shape[0] * z3.shape[1]
        _check_token_count(num_tokens)
        out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        # With every head selected, autograd saves z itself instead (see lofit_fast.ops).
        save_selected = save_selected and scale is not None and num_selected < num_heads
        z_selected = z.new_empty((num_tokens, num_selected, head_dim) if save_selected else (0,))
        if num_tokens == 0:
            return out, z_selected
        routed = adapter_index is not None
        # Batch rows are z's dim 0, whatever _as_3d merged: token t (flattened) is in row t // tokens_per_row.
        tokens_per_row = num_tokens // adapter_index.numel() if routed else 1
        num_adapters = params.shape[0] if routed else 0
        seq_len, [z_strides] = _token_strides(z3)
        tokens_bucket = _tokens_bucket(num_tokens)
        self._launch(
            "forward", lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), num_heads),
            (z3, out, z_selected, head_index, _contiguous(scale), _contiguous(offset), adapter_index,
             num_tokens, seq_len, tokens_per_row, num_selected, num_adapters, tokens_bucket,
             *z_strides),
            tokens_bucket,
            HEAD_DIM=head_dim, NUM_HEADS=num_heads,
            HAS_SCALE=scale is not None, HAS_OFFSET=offset is not None, SAVE_SELECTED=save_selected, ROUTED=routed,
            BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_K=max(1, triton.next_power_of_2(num_selected)),
        )
        return out, z_selected

    def backward(self, grad_out, saved, head_index, scale, head_dim,
                 need_grad_z, need_grad_scale, need_grad_offset, adapter_index=None):
        """Returns (grad_z or None, grad_scale or None, grad_offset or None).

        `saved` is z itself when every head is selected, else z_selected from the forward (slot order).

        grad_z is None when there is no scale (the gradient then passes through unchanged and the caller
        hands grad_out on as it is) or when it is not needed (z of the lowest patched layer).

        With `adapter_index` (B,), grad_scale / grad_offset are the sums per batch row, (B, K, head_dim), which
        `lofit_fast.ops` reduces to the adapters; scale's first dimension bounds the adapter indices read.
        """
        num_heads = grad_out.shape[-1] // head_dim
        num_selected = head_index.numel()
        g3 = _as_3d(grad_out)
        num_tokens = g3.shape[0] * g3.shape[1]
        _check_token_count(num_tokens)
        write_grad_z = need_grad_z and scale is not None
        need_grad_scale = need_grad_scale and scale is not None
        if not (write_grad_z or need_grad_scale or need_grad_offset):
            return None, None, None
        saved_by_head = num_selected == num_heads
        if need_grad_scale:
            # Index the saved activation with grad_out's (batch, token) layout; z_selected is (tokens, K, D).
            s3 = _as_3d(saved) if saved_by_head else saved.view(g3.shape[0], g3.shape[1], num_selected * head_dim)
            seq_len, (g_strides, s_strides) = _token_strides(g3, s3)
        else:
            s3 = saved
            seq_len, (g_strides,) = _token_strides(g3)
            s_strides = (0, 0, 0)
        # Axis 1 of the grid, and of the partial sums: every head when grad_z is written, else the selected ones.
        num_columns = num_heads if write_grad_z else num_selected
        routed = adapter_index is not None
        # Without routing all tokens form one row. Routed, the rows are grad_out's dim 0 and no chunk crosses from
        # one row into the next: its sums and its scale row belong to that row's adapter.
        num_rows = adapter_index.numel() if routed else 1
        tokens_per_row = num_tokens // num_rows if num_rows else 0
        tokens_per_program = _tokens_per_program(tokens_per_row, num_rows, num_columns,
                                                 self._multiprocessors(grad_out.device))
        chunks_per_row = max(1, triton.cdiv(tokens_per_row, tokens_per_program))
        programs = num_rows * chunks_per_row
        num_adapters = scale.shape[0] if routed and scale is not None else 0

        grad_z = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device) if write_grad_z else None
        partial_shape = (programs, num_columns, head_dim)
        f32 = dict(dtype=torch.float32, device=grad_out.device)
        grad_scale_partial = torch.empty(partial_shape, **f32) if need_grad_scale else None
        grad_offset_partial = torch.empty(partial_shape, **f32) if need_grad_offset else None
        if num_tokens == 0:
            # Programs with no tokens write nothing: zero-fill then.
            for partial in (grad_scale_partial, grad_offset_partial):
                if partial is not None:
                    partial.zero_()
        elif num_columns > 0:
            # The grid does not depend on the config: the partial buffers above fit any of them.
            self._launch(
                "backward", lambda meta: (programs, num_columns),
                (g3, s3, grad_z, grad_scale_partial, grad_offset_partial,
                 head_index, _contiguous(scale), adapter_index,
                 seq_len, tokens_per_row, chunks_per_row, tokens_per_program, num_selected, num_adapters,
                 *g_strides, *s_strides),
                tokens_per_program,
                HEAD_DIM=head_dim, NUM_HEADS=num_heads, SAVED_BY_HEAD=saved_by_head,
                HAS_SCALE=scale is not None, WRITE_GRAD_Z=write_grad_z,
                NEED_GRAD_SCALE=need_grad_scale, NEED_GRAD_OFFSET=need_grad_offset, ROUTED=routed,
                BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_K=max(1, triton.next_power_of_2(num_selected)),
            )

        def total(partial):
            """Sum of the chunks' partials (over all of them, or routed, over each row's chunks), in slot order. With
            a column per head only the selected heads' rows were written: those are picked first when they are few
            (less to read), the sums picked after when every head is selected."""
            chunks = partial.view(num_rows, chunks_per_row, num_columns, head_dim) if routed else partial
            if write_grad_z and num_selected < num_columns:
                chunks = chunks.index_select(-2, head_index)
            sums = chunks.sum(-3)
            return sums.index_select(-2, head_index) if write_grad_z and num_selected == num_columns else sums

        grad_scale = total(grad_scale_partial) if need_grad_scale else None
        grad_offset = total(grad_offset_partial) if need_grad_offset else None
        return grad_z, grad_scale, grad_offset


# `triton.jit` chose between compiling and interpreting when Triton was imported; the module's launchers follow it.
_knobs = getattr(triton, "knobs", None)
_INTERPRETED = bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"
# This process's kernels: compiled on a GPU, interpreted under TRITON_INTERPRET=1.
KERNELS = HeadAffineKernels(interpreted=_INTERPRETED)


def head_affine_forward(z, head_index, scale, offset, save_selected, adapter_index=None):
    """`HeadAffineKernels.forward` of this process's kernels."""
    return KERNELS.forward(z, head_index, scale, offset, save_selected, adapter_index)


def head_affine_backward(grad_out, saved, head_index, scale, head_dim,
                         need_grad_z, need_grad_scale, need_grad_offset, adapter_index=None):
    """`HeadAffineKernels.backward` of this process's kernels."""
    return KERNELS.backward(grad_out, saved, head_index, scale, head_dim, need_grad_z, need_grad_scale,
                             need_grad_offset, adapter_index)
