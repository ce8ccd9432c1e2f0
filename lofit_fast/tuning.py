"""`warmup`: tune and compile LoFiT's Triton kernels for the shapes a model will see, before it serves requests
or is captured in a CUDA graph.

    handle = lofit_fast.patch_model(model, heads=heads)
    lofit_fast.warmup(model, seq_lens=(1, 512, 2048), batch_sizes=(1, 8))
    # ... torch.cuda.graphs / serving / training

The first call of the kernels for a new autotuning key (token-count bucket, head_dim, flags, dtypes) times every
config that the pruning keeps: seconds of host work, allocations and synchronizations, which a CUDA graph
capture cannot contain and a server's first request should not wait for. `warmup` runs the model once for each
shape (forward, and backward when training), so that every key the model's layers will use is tuned (or read
from Triton's tuning cache on disk) and compiled. On a model whose LoFiT layers do not run compiled kernels (on
the CPU, for one) there is nothing to tune and it returns at once.
"""

from typing import Iterable, Optional

import torch
from torch import nn

from .ops import triton_interpreter_enabled, triton_unavailable_reason
from .patch import first_parameter_device


def runs_compiled_kernels(model: nn.Module) -> bool:
    """Whether `model` can run LoFiT's compiled Triton kernels: it is on a CUDA device and Triton is not in its
    interpreter."""
    device = first_parameter_device(model)
    return device.type == "cuda" and triton_unavailable_reason(device) is None and not triton_interpreter_enabled()


def warmup(model: nn.Module, seq_lens: Iterable[int], batch_sizes: Iterable[int] = (1,),
           backward: Optional[bool] = None, token_id: int = 0) -> list:
    """Run `model` on every (batch size, sequence length) once, so that the LoFiT kernels of all its layers are
    tuned and compiled for those shapes. Gradients, optimizer state, the random number generators and the
    model's mode are left as they were.

    Args:
        model: a model with LoFiT attached (`patch_model`, `load_adapter`, `get_lofit_model`); with several
            adapters (`load_adapters`), call it inside `with handle.route(names):`.
        seq_lens: sequence lengths to run, 1 for decoding steps (with a KV cache the layers see one token per row).
        batch_sizes: batch sizes to run each length with.
        backward: also run backward, as training does; default: when the model is in training mode and has
            parameters that require grad.
        token_id: the token every input position holds.

    Returns the (batch size, sequence length) pairs run; empty when the model does not run compiled kernels.
    """
    if not runs_compiled_kernels(model):
        return []
    device = first_parameter_device(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if backward is None:
        backward = model.training and bool(trainable)
    shapes = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for batch in batch_sizes:
            for seq_len in seq_lens:
                ids = torch.full((batch, seq_len), token_id, dtype=torch.long, device=device)
                with torch.set_grad_enabled(backward):
                    output = model(input_ids=ids)
                    if backward:
                        logits = output.logits if hasattr(output, "logits") else output[0]
                        # autograd.grad, not backward(): nothing accumulates in .grad.
                        torch.autograd.grad(logits.float().sum(), trainable, allow_unused=True)
                del output
                shapes.append((batch, seq_len))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return shapes
