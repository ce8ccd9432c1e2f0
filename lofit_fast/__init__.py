"""lofit_fast: LoFiT (localized fine-tuning on LLM representations) with fused Triton kernels.

    handle = lofit_fast.patch_model(model, heads=[(layer, head), ...])
"""

from .adapter import load_adapter
from .multi import MultiAdapterHandle, load_adapters
from .ops import head_affine
from .patch import ARCHITECTURES, LofitHandle, patch_model, register_architecture
from .tuning import warmup
from .version import __version__

# The training steps import transformers' Trainer and the k-bit helpers bitsandbytes (seconds each):
# loaded on first use, so `import lofit_fast` and patch_model stay quick.
_LAZY = {"prepare_kbit_training": "quantization", "quantization_info": "quantization",
         "select_heads": "training", "tune": "training", "HeadRanking": "ranking", "StepSettings": "settings",
         "paper_settings": "settings", "random_ranking": "ranking", "LofitCheckpointing": "training",
         "probe_ranking": "probing",
         "LofitConfig": "lofit_model", "LofitModel": "lofit_model", "get_lofit_model": "lofit_model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lofit_fast' has no attribute {name!r}")



__all__ = ["patch_model", "LofitHandle", "register_architecture", "ARCHITECTURES", "head_affine", "load_adapter",
           "load_adapters", "MultiAdapterHandle", "warmup",
           "prepare_kbit_training", "quantization_info", "select_heads", "tune", "HeadRanking", "StepSettings",
           "paper_settings", "random_ranking", "LofitCheckpointing", "probe_ranking", "LofitConfig", "LofitModel",
           "get_lofit_model", "__version__"]
