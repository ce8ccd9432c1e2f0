"""Triton kernels of lofit_fast, shipped as the subpackage `lofit_fast.kernels`.

Importing this module imports Triton; `lofit_fast.ops` does so only when the Triton backend is used.
`lofit_fast.kernels.cross_compile` (imported on its own) compiles the kernels for CUDA targets without a GPU.
"""

from .head_affine import head_affine_backward, head_affine_forward

__all__ = ["head_affine_forward", "head_affine_backward"]
