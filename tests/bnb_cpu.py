"""bitsandbytes' 4-bit CPU inference path, on CPUs that have it and on CPUs that do not.

On x86 CPUs with AVX512-BF16, a bitsandbytes `Linear4bit` repacks its weight for a fused CPU kernel
(`bitsandbytes::gemv_4bit`) the first time it runs in eval mode on an input that needs no grad, and from
then on multiplies with that kernel, in any mode. The kernel has no backward. On other CPUs neither
happens. Whether a layer does it is `Linear4bit.support_avx512bf16_for_cpu`, set in its `__init__` from
`bitsandbytes.functional.has_avx512bf16()`.

So that a machine of either kind checks both behaviours:
- `emulated_repacking_kernel()` registers, on a CPU without the fused kernel, a plain-torch stand-in for
  it: the same packed layout, bf16 input and block scales, bf16 output, and no autograd, like the real one.
  On a CPU with the real kernel it does nothing.
- `cpu_kind(kind)` makes layers built afterwards behave as on a CPU of that kind ("avx512bf16" or
  "plain"), with the stand-in where the real kernel is missing. The environment variable
  LOFIT_TEST_CPU_KIND does the same for a whole test session (see conftest.py).

Nothing here imports lofit_fast.
"""

import contextlib
from typing import Iterator, Sequence

import torch

CPU_KINDS = ("avx512bf16", "plain")

# bitsandbytes' packed layout: 32 output rows per block, two 4-bit codes per byte (functional.py,
# _convert_weight_packed_for_cpu).
_BLOCK_N = 32


def has_real_repacking_kernel() -> bool:
    """Whether this CPU runs bitsandbytes' fused 4-bit kernel (it has AVX512-BF16)."""
    import bitsandbytes.functional

    return bool(bitsandbytes.functional.has_avx512bf16())


def unpack_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """(out_features, in_features) 4-bit codes of a weight in bitsandbytes' CPU packing (uint8, [N, K/2])."""
    packed = packed.reshape(-1, _BLOCK_N)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # per byte: low nibbles, then high ones
    codes = codes.reshape(out_features // _BLOCK_N, in_features // 2, _BLOCK_N, 2).transpose(1, 2)
    return codes.reshape(out_features, in_features).long()


def _emulated_gemv_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor,
                        code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """What bitsandbytes' fused CPU kernel computes: bf16 A times the dequantized packed weight, whose
    block scales are bf16 (absmax is (in_features / blocksize, out_features) after packing), out in bf16."""
    out_features, in_features = shapeB
    codes = unpack_codes(B.view(torch.uint8), out_features, in_features)
    scales = absmax.to(torch.bfloat16).float().T.repeat_interleave(blocksize, dim=1)
    weight = (code.float()[codes] * scales).to(torch.bfloat16).float()
    out = A.to(torch.bfloat16).float() @ weight.T
    return out.to(torch.bfloat16).to(A.dtype)


_emulation_depth = 0


@contextlib.contextmanager
def emulated_repacking_kernel() -> Iterator[None]:
    """Inside the block, bitsandbytes' packed 4-bit CPU kernel exists on this CPU: the real one, or the
    stand-in above where the CPU lacks AVX512-BF16."""
    global _emulation_depth
    if has_real_repacking_kernel():
        yield
        return
    library = None
    if _emulation_depth == 0:  # an op takes one CPU kernel: register it in the outermost block only
        library = torch.library.Library("bitsandbytes", "IMPL")
        library.impl("gemv_4bit", _emulated_gemv_4bit, "CPU")
    _emulation_depth += 1
    try:
        yield
    finally:
        _emulation_depth -= 1
        if library is not None:
            library._destroy()


@contextlib.contextmanager
def cpu_kind(kind: str) -> Iterator[None]:
    """Linear4bit layers built inside the block repack (kind "avx512bf16") or never do ("plain"), whatever
    this CPU is; the packed kernel is emulated where needed. Layers built before keep their setting (set
    `layer.support_avx512bf16_for_cpu` to change one)."""
    if kind not in CPU_KINDS:
        raise ValueError(f"cpu kind must be one of {CPU_KINDS}, not {kind!r}")
    import bitsandbytes.nn.modules as modules

    original = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: kind == "avx512bf16"
    try:
        with emulated_repacking_kernel() if kind == "avx512bf16" else contextlib.nullcontext():
            yield
    finally:
        modules.has_avx512bf16 = original


def is_repacked(layer: torch.nn.Module) -> bool:
    """Whether a Linear4bit's weight is in the packed CPU layout."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
