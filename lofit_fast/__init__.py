"""lofit_fast: LoFiT (localized fine-tuning on LLM representations) with fused Triton kernels.

    handle = lofit_fast.patch_model(model, heads=[(layer, head), ...])
"""

from .adapter import load_adapter
from .ops import head_affine
from .patch import ARCHITECTURES, LofitHandle, patch_model, register_architecture

__version__ = "0.1.0"

__all__ = ["patch_model", "LofitHandle", "register_architecture", "ARCHITECTURES", "head_affine", "load_adapter",
           "__version__"]
