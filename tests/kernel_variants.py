"""Every kind of launch the head_affine kernels get: one list that two suites run.

`test_ops.test_kernel_variant_matches_torch` runs each variant through the launchers of this process (Triton's
interpreter on the CPU, the compiled kernels on a GPU) against the torch implementation in fp64;
`test_kernels_compile` compiles each one, through the same launchers, for sm_80, sm_86, sm_89 and sm_90. A variant
that runs but does not compile, or compiles but computes the wrong thing, fails one of them.

The list covers the constexpr flags in full (forward: HAS_SCALE x HAS_OFFSET x SAVE_SELECTED x ROUTED; backward:
HAS_SCALE x WRITE_GRAD_Z x NEED_GRAD_SCALE x NEED_GRAD_OFFSET x ROUTED x every head selected) and, spread over
those, every dtype (bf16, fp16, fp32), head_dim (64, 80, 96, 128, 256), K (one head, some, all), size (decoding,
a few rows, 16k tokens) and layout (contiguous, strided tokens, strided channels, batch and tokens swapped), plus
no head selected (K = 0), and the launches that training makes on a Llama-2-7B layer (32 heads of 128, bf16),
which `test_kernels_compile` compiles in every config the pruning keeps, not one. `test_kernels_compile` checks that
the spread reaches every value for both kernels.
"""

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (64, 80, 96, 128, 256)
SIZES = ("decode", "rows", "16k")
LAYOUTS = ("contiguous", "token slice", "channel stride", "batch/token swapped")
SELECTIONS = ("one", "some", "all")
NUM_ADAPTERS = 3


@dataclass(frozen=True)
class Variant:
    """One launcher call: `kernel` ("forward" or "backward") with these flags on z of this kind."""

    kernel: str
    scale: bool
    offset: bool
    routed: bool
    selection: str  # "none", "one", "some" or "all" heads
    dtype: torch.dtype
    head_dim: int
    size: str
    layout: str
    save_selected: bool = False  # forward
    need_grad_z: bool = False  # backward
    need_grad_scale: bool = False
    need_grad_offset: bool = False
    every_config: bool = False  # compile every config the pruning keeps (the training launches)

    @property
    def num_heads(self) -> int:
        # Long variants have few heads: the interpreter runs them too. "model": a Llama-2-7B layer.
        return {"16k": 2, "model": 32}.get(self.size, 5)

    @property
    def heads(self) -> list:
        some = {5: [4, 0, 2], 2: [1], 32: [8, 24]}[self.num_heads]
        return {"none": [], "one": [self.num_heads - 2], "some": some,
                "all": list(reversed(range(self.num_heads)))}[self.selection]

    @property
    def lead(self) -> tuple:
        """Leading shape of z, batch rows first."""
        if self.size == "decode":
            return (4, 1) if self.routed else (1, 1)
        if self.size == "rows":
            return (3, 37)
        if self.size == "model":
            return (2, 128)
        return (2, 8192) if self.routed else (1, 16384)

    @property
    def id(self) -> str:
        flags = [name for name, on in (("scale", self.scale), ("offset", self.offset), ("routed", self.routed),
                                       ("save", self.save_selected), ("grad_z", self.need_grad_z),
                                       ("grad_scale", self.need_grad_scale), ("grad_offset", self.need_grad_offset))
                 if on]
        dtype = str(self.dtype).replace("torch.", "")
        layout = self.layout.replace(" ", "-").replace("/", "-")
        return f"{self.kernel}-{'+'.join(flags)}-K{self.selection}-{dtype}-D{self.head_dim}-{self.size}-{layout}"


def _forward_flags():
    for scale, offset, routed in itertools.product((True, False), (True, False), (False, True)):
        if not (scale or offset):
            continue
        for save in ((True, False) if scale else (False,)):
            yield dict(scale=scale, offset=offset, routed=routed, save_selected=save)


def _backward_flags():
    for routed, every_head in itertools.product((False, True), (False, True)):
        yield dict(scale=False, offset=True, routed=routed, every_head=every_head, need_grad_offset=True)
        for grad_z, grad_scale, grad_offset in itertools.product((True, False), repeat=3):
            if grad_z or grad_scale or grad_offset:
                yield dict(scale=True, offset=grad_offset, routed=routed, every_head=every_head, need_grad_z=grad_z,
                           need_grad_scale=grad_scale, need_grad_offset=grad_offset)


def _spread(kernel: str, flag_sets) -> list:
    """Variants for `flag_sets`, the i-th taking the i-th value of each other dimension (cycling, each dimension
    at its own pace so that the values meet in many combinations)."""
    variants = []
    for i, flags in enumerate(flag_sets):
        flags = dict(flags)
        every_head = flags.pop("every_head", None)
        if every_head:
            selection = "all"
        elif every_head is False or flags.get("save_selected"):
            selection = ("one", "some")[i % 2]
        else:
            selection = SELECTIONS[i % 3]
        variants.append(Variant(kernel, selection=selection, dtype=DTYPES[i % 3], head_dim=HEAD_DIMS[(2 * i) % 5],
                                size=SIZES[(i // 2) % 3], layout=LAYOUTS[(i + i // 4) % 4], **flags))
    return variants


VARIANTS = (
    _spread("forward", _forward_flags())
    + _spread("backward", _backward_flags())
    + [Variant(kernel, selection=selection, dtype=torch.bfloat16, head_dim=128, size="model", layout="contiguous",
               routed=False, every_config=True, **flags)
       for kernel, selection, flags in (
           ("forward", "all", dict(scale=True, offset=False)),  # step 1
           ("forward", "some", dict(scale=True, offset=True, save_selected=True)),  # step 2 with scales
           ("forward", "some", dict(scale=False, offset=True)),
           ("backward", "all", dict(scale=True, offset=False, need_grad_z=True, need_grad_scale=True)),
           ("backward", "some", dict(scale=True, offset=True, need_grad_z=True, need_grad_scale=True,
                                     need_grad_offset=True)),
           ("backward", "some", dict(scale=True, offset=True, need_grad_scale=True, need_grad_offset=True)),  # lowest
           ("backward", "some", dict(scale=False, offset=True, need_grad_offset=True)))]
    # No head selected: nothing to transform, everything to copy, and no tl.arange(0, 0) to compile.
    + [Variant("forward", scale=True, offset=True, routed=False, selection="none", dtype=torch.bfloat16,
               head_dim=128, size="rows", layout="contiguous", save_selected=True),
       Variant("backward", scale=True, offset=True, routed=False, selection="none", dtype=torch.bfloat16,
               head_dim=128, size="rows", layout="contiguous", need_grad_z=True, need_grad_scale=True,
               need_grad_offset=True)]
)


# ----------------------------------------------------------------------------------------------
# Tensors and the launcher call
# ----------------------------------------------------------------------------------------------

def _tensor(shape, dtype, device, generator):
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _laid_out(shape, layout, dtype, device, generator):
    """A (batch, tokens, channels) tensor of `shape` in `layout` (a view where not contiguous)."""
    batch, tokens, channels = shape
    if layout == "contiguous":
        return _tensor(shape, dtype, device, generator)
    if layout == "token slice":
        return _tensor((batch, 2 * tokens, channels), dtype, device, generator)[:, ::2]
    if layout == "channel stride":
        return _tensor((batch, tokens, 2 * channels), dtype, device, generator)[..., ::2]
    if layout == "batch/token swapped":
        return _tensor((tokens, batch, channels), dtype, device, generator).transpose(0, 1)
    raise ValueError(layout)


@dataclass
class Inputs:
    z: torch.Tensor
    grad_out: Optional[torch.Tensor]
    head_index: torch.Tensor
    scale: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    adapter_index: Optional[torch.Tensor]
    saved: Optional[torch.Tensor]


def make_inputs(variant: Variant, device, seed: int = 0) -> Inputs:
    """Random inputs of `variant` on `device` (shapes only on the meta device)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = variant.lead
    shape = (batch, tokens, variant.num_heads * variant.head_dim)
    z = _laid_out(shape, variant.layout, variant.dtype, device, generator)
    heads = variant.heads
    head_index = torch.tensor(heads, dtype=torch.long).to(device)
    params_shape = (NUM_ADAPTERS, len(heads), variant.head_dim) if variant.routed else (len(heads), variant.head_dim)
    scale = _tensor(params_shape, torch.float32, device, generator) if variant.scale else None
    offset = _tensor(params_shape, torch.float32, device, generator) if variant.offset else None
    adapter_index = None
    if variant.routed:
        # Every adapter, and a row without one (-1) when there are rows enough.
        rows = [2, -1, 0, 1][:batch] if batch > 2 else [2, 0][:batch]
        adapter_index = torch.tensor(rows, dtype=torch.long).to(device)
    grad_out = saved = None
    if variant.kernel == "backward":
        # The upstream gradient gets another layout than z, as in test_ops.
        grad_layout = LAYOUTS[(LAYOUTS.index(variant.layout) + 1) % len(LAYOUTS)]
        grad_out = _laid_out(shape, grad_layout, variant.dtype, device, generator)
        if variant.need_grad_scale and variant.scale:
            if len(heads) == variant.num_heads:
                saved = z
            elif device.type == "meta":
                saved = torch.empty((batch * tokens, len(heads), variant.head_dim), dtype=variant.dtype, device=device)
            else:
                saved = z.unflatten(-1, (variant.num_heads, variant.head_dim))[..., heads, :].reshape(
                    batch * tokens, len(heads), variant.head_dim)
    return Inputs(z, grad_out, head_index, scale, offset, adapter_index, saved)


def launch(launchers, variant: Variant, inputs: Inputs):
    """The launcher call of `variant`: `launchers` is anything with HeadAffineKernels' forward / backward."""
    if variant.kernel == "forward":
        return launchers.forward(inputs.z, inputs.head_index, inputs.scale, inputs.offset, variant.save_selected,
                                 inputs.adapter_index)
    return launchers.backward(inputs.grad_out, inputs.saved, inputs.head_index, inputs.scale, variant.head_dim,
                              variant.need_grad_z, variant.need_grad_scale, variant.need_grad_offset,
                              inputs.adapter_index)
