"""Triton kernels of lofit_fast, shipped as the subpackage `lofit_fast.kernels`.

Importing this module imports Triton; `lofit_fast.ops` does so only when the Triton backend is used.
"""

from .head_affine import head_affine_backward, head_affine_forward

__all__ = ["head_affine_forward", "head_affine_backward"]
