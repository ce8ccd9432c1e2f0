"""`lofit_fast::head_affine` on both backends against the fp64 reference.

Every check draws fresh random z, scale, offset and upstream gradient (never zeros), runs the op on
the "torch" and the "triton" backend (compiled on a GPU, interpreted on the CPU, see conftest.py) and
compares the output and the gradients of z, scale and offset with `head_affine_reference` run by
autograd in fp64 on the same values.
"""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

from lofit_fast import ops
from lofit_fast.ops import (
    head_affine,
    head_affine_reference,
    head_affine_torch_backward,
    head_affine_torch_forward,
    resolve_backend,
)

from kernel_variants import VARIANTS, launch, make_inputs

BACKENDS = ["torch", "triton"]
MODES = {"scale": (True, False), "offset": (False, True), "both": (True, True)}

# (name, leading shape of z, num_heads, head_dim, head_index)
SHAPES = [
    ("1 token", (1, 1), 5, 12, [3]),
    ("37 tokens 2d, heads out of order", (37,), 5, 7, [4, 0, 2]),
    ("3x67 tokens", (3, 67), 5, 12, [1, 3]),
    ("1 head, K=all", (2, 9), 1, 12, [0]),
    ("16 heads, K=all out of order", (2, 9), 16, 7, [5, 0, 12, 3, 15, 1, 9, 2, 14, 7, 4, 11, 8, 13, 6, 10]),
    ("16 heads, K=1", (2, 40), 16, 7, [9]),
    ("4d z", (2, 3, 5), 5, 12, [2, 4]),
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def make_params(num_selected, head_dim, mode, device, seed=0, requires_grad=True):
    """Random fp32 (scale, offset) for `mode`; the one that `mode` leaves out is None."""
    generator = torch.Generator().manual_seed(seed + 1000)
    has_scale, has_offset = MODES[mode]

    def param():
        value = torch.randn(num_selected, head_dim, generator=generator).to(device)
        return value.requires_grad_(requires_grad)

    return (param() if has_scale else None), (param() if has_offset else None)


def random_tensor(shape, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def selected_columns(head_index, head_dim, num_heads):
    """Boolean mask over the num_heads * head_dim channels: True on the selected heads."""
    mask = torch.zeros(num_heads, head_dim, dtype=torch.bool)
    mask[list(head_index)] = True
    return mask.flatten()


def ulp(reference: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """The spacing of the low-precision format at the magnitude of `reference` (fp64)."""
    _, exponent = torch.frexp(reference)
    return torch.ldexp(torch.ones_like(reference), exponent - 1 - mantissa_bits)


# How far a result of dtype may be from the exact (fp64) value of the same inputs.
# fp32: the op computes in fp32; a few roundings of values of size ~10.
# bf16 / fp16: computed in fp32, rounded once on store: within 1 ulp (round to nearest gives half an
# ulp; the Triton interpreter rounds bf16 by truncation, which gives up to one), plus the fp32 error.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
# Parameter gradients are fp32 sums over tokens of fp32 products, whatever the dtype of z.
PARAM_GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def assert_matches(actual, expected, dtype, what):
    """`actual` (of `dtype`) against the fp64 `expected`, with the tolerance of that dtype."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if dtype in MANTISSA_BITS:
        error = (actual.double().cpu() - expected.cpu()).abs()
        # + the fp32 rounding before the cast, absolute where z * (1 + a) and v nearly cancel.
        allowed = ulp(expected.cpu(), MANTISSA_BITS[dtype]) + 1e-6 * expected.cpu().abs() + 1e-6
        worst = (error / allowed).max().item() if error.numel() else 0.0
        assert worst <= 1.0, f"{what}: off by {worst:.2f} of the allowed 1 ulp (max error {error.max():.3g})"
    else:
        torch.testing.assert_close(actual.double(), expected, **FP32_TOL, msg=lambda m: f"{what}: {m}")


def as_fp64(tensor):
    """An fp64 copy of `tensor` (None stays None) that requires grad when the original does."""
    return None if tensor is None else tensor.detach().double().requires_grad_(tensor.requires_grad)


def run_and_compare(z, head_index, scale, offset, backend, grad_out=None, seed=1, adapter_index=None):
    """Run head_affine on `backend` and the fp64 reference on the same values; compare the output and
    the gradients of every input that requires grad. Returns (out, grads) of the op.

    With `adapter_index` (one adapter per batch row, -1 for none) the routed op runs against the row-by-row
    reference, and also: rows with -1 pass through bit for bit, adapters no row uses get zero gradients."""
    device = z.device
    index = torch.tensor(head_index, device=device)
    adapters = None if adapter_index is None else torch.as_tensor(adapter_index, device=device)
    out = head_affine(z, index, scale, offset, backend=backend, adapter_index=adapters)

    z64, scale64, offset64 = as_fp64(z), as_fp64(scale), as_fp64(offset)
    expected = head_affine_reference(z64, index, scale64, offset64, adapter_index=adapters)

    assert out.shape == z.shape
    assert_matches(out, expected, z.dtype, "output")
    # Unselected heads (and rows without an adapter) are copied bit for bit.
    head_dim = (scale if scale is not None else offset).shape[-1]
    keep = ~selected_columns(head_index, head_dim, z.shape[-1] // head_dim).to(device)
    assert torch.equal(out[..., keep], z.detach()[..., keep]), "unselected heads changed"
    if adapters is not None:
        assert torch.equal(out[adapters == -1], z.detach()[adapters == -1]), "a row with adapter -1 changed"

    inputs = [t for t in (z, scale, offset) if t is not None and t.requires_grad]
    inputs64 = [t for t in (z64, scale64, offset64) if t is not None and t.requires_grad]
    if not inputs:
        return out, ()
    if grad_out is None:
        grad_out = random_tensor(z.shape, z.dtype, device, seed)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double())
    unused = []
    if adapters is not None:
        num_adapters = (scale if scale is not None else offset).shape[0]
        unused = [adapter for adapter in range(num_adapters) if adapter not in adapters.tolist()]
    for grad, expected_grad, tensor in zip(grads, expected_grads, inputs):
        if tensor is z:
            assert_matches(grad, expected_grad, z.dtype, "grad of z")
            assert torch.equal(grad[..., keep], grad_out[..., keep]), "grad of unselected heads is not g"
            if adapters is not None:
                assert torch.equal(grad[adapters == -1], grad_out[adapters == -1]), "grad of a row with -1 is not g"
        else:
            assert grad.dtype == tensor.dtype and grad.shape == tensor.shape
            torch.testing.assert_close(grad.double(), expected_grad, **PARAM_GRAD_TOL,
                                       msg=lambda m: f"grad of a parameter: {m}")
            for adapter in unused:
                assert torch.equal(grad[adapter], torch.zeros_like(grad[adapter])), f"adapter {adapter} unused"
    return out, grads


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", SHAPES, ids=[case[0] for case in SHAPES])
def test_fp32_matches_reference(case, mode, backend, device):
    _, lead, num_heads, head_dim, head_index = case
    z = random_tensor((*lead, num_heads * head_dim), torch.float32, device, seed=0).requires_grad_()
    scale, offset = make_params(len(head_index), head_dim, mode, device)
    run_and_compare(z, head_index, scale, offset, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_256(backend, device):
    z = random_tensor((2, 5, 3 * 256), torch.float32, device, seed=3).requires_grad_()
    scale, offset = make_params(2, 256, "both", device)
    run_and_compare(z, [2, 0], scale, offset, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["scale", "both"])
@pytest.mark.parametrize("head_index", [[1, 3], [2, 0, 3, 4, 1]], ids=["K=2", "K=all"])
def test_low_precision_z_with_fp32_params(head_index, mode, dtype, backend, device):
    z = random_tensor((3, 67, 5 * 12), dtype, device, seed=4).requires_grad_()
    scale, offset = make_params(len(head_index), 12, mode, device)
    run_and_compare(z, head_index, scale, offset, backend)


def non_contiguous(layout, shape, dtype, device, seed):
    """A non-contiguous tensor of `shape` (batch, tokens, channels) with the given layout."""
    batch, tokens, channels = shape
    if layout == "token slice":
        full = random_tensor((batch, 2 * tokens, channels), dtype, device, seed)
        view = full[:, ::2]
    elif layout == "transposed batch/token":
        view = random_tensor((tokens, batch, channels), dtype, device, seed).transpose(0, 1)
    elif layout == "channel stride":
        view = random_tensor((batch, tokens, 2 * channels), dtype, device, seed)[..., ::2]
    else:
        raise AssertionError(layout)
    assert view.shape == shape and not view.is_contiguous()
    return view


LAYOUTS = ["token slice", "transposed batch/token", "channel stride"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_index", [[3, 1], [2, 0, 3, 1]], ids=["K=2", "K=all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_z_and_grad(layout, head_index, backend, device):
    shape = (3, 23, 4 * 12)
    z = non_contiguous(layout, shape, torch.float32, device, seed=5).requires_grad_()
    # The upstream gradient gets a different non-contiguous layout than z.
    grad_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    grad_out = non_contiguous(grad_layout, shape, torch.float32, device, seed=6)
    scale, offset = make_params(len(head_index), 12, "both", device)
    run_and_compare(z, head_index, scale, offset, backend, grad_out=grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("head_index", [[4, 1], [1, 0, 2, 4, 3]], ids=["K=2", "K=all"])
def test_z_without_grad_gives_param_grads_only(head_index, mode, backend, device, monkeypatch):
    """The lowest patched layer: z needs no gradient, so backward must not compute one."""
    calls = []
    backward_op = ops._head_affine_backward_op

    def recording_backward_op(*args):
        calls.append(args[5])  # need_grad_z
        return backward_op(*args)

    monkeypatch.setattr(ops, "_head_affine_backward_op", recording_backward_op)
    z = random_tensor((2, 70, 5 * 7), torch.float32, device, seed=7)
    scale, offset = make_params(len(head_index), 7, mode, device)
    _, grads = run_and_compare(z, head_index, scale, offset, backend)
    assert len(grads) == sum(p is not None for p in (scale, offset))
    assert calls == [False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_index", [[4, 1], [1, 0, 2, 4, 3]], ids=["K=2", "K=all"])
def test_frozen_scale_trained_offset(head_index, backend, device):
    """A scale that does not require grad is applied, but neither saved for nor differentiated in backward."""
    z = random_tensor((2, 9, 5 * 7), torch.float32, device, seed=8).requires_grad_()
    scale, offset = make_params(len(head_index), 7, "both", device)
    scale.requires_grad_(False)
    run_and_compare(z, head_index, scale, offset, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_zero_tokens(mode, backend, device):
    z = torch.empty(2, 0, 4 * 8, device=device).requires_grad_()
    scale, offset = make_params(2, 8, mode, device)
    out = head_affine(z, torch.tensor([3, 0], device=device), scale, offset, backend=backend)
    assert out.shape == z.shape
    params = [p for p in (scale, offset) if p is not None]
    grads = torch.autograd.grad(out, [z, *params], torch.empty_like(out))
    assert grads[0].shape == z.shape
    for grad, param in zip(grads[1:], params):
        assert torch.equal(grad, torch.zeros_like(param))


def test_fp64_runs_on_torch_and_matches_reference(device):
    z = random_tensor((2, 11, 5 * 7), torch.float64, device, seed=9).requires_grad_()
    scale, offset = make_params(2, 7, "both", device)
    scale, offset = (p.detach().double().requires_grad_() for p in (scale, offset))
    index = torch.tensor([4, 2], device=device)
    out = head_affine(z, index, scale, offset, backend="auto")
    expected = head_affine_reference(z, index, scale, offset)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for grad, expected_grad in zip(torch.autograd.grad(out, [z, scale, offset], g),
                                   torch.autograd.grad(expected, [z, scale, offset], g)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Kernels write every element they return, and touch only what they should
# ----------------------------------------------------------------------------------------------

class _NanFilledTorch:
    """Stands in for the `torch` module inside the kernel launchers: `torch.empty` returns NaN-filled
    memory, so an element a kernel forgets to write shows up as NaN. Everything else is torch's."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        tensor = torch.empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor


@pytest.fixture
def nan_filled_allocations(monkeypatch):
    """Make the launchers' `torch.empty` and `Tensor.new_empty` return NaN-filled tensors."""
    launchers = importlib.import_module("lofit_fast.kernels.head_affine")
    monkeypatch.setattr(launchers, "torch", _NanFilledTorch())
    new_empty = torch.Tensor.new_empty

    def nan_new_empty(self, *args, **kwargs):
        tensor = new_empty(self, *args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)
    return launchers


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("head_index", [[3], [1, 4], [2, 0, 3, 4, 1]], ids=["K=1", "K=2", "K=all"])
def test_launchers_write_every_element(head_index, mode, device, nan_filled_allocations):
    """201 tokens: several token blocks in forward and several token programs in backward."""
    launchers = nan_filled_allocations
    num_heads, head_dim = 5, 12
    z = random_tensor((3, 67, num_heads * head_dim), torch.float32, device, seed=10)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=11)
    scale, offset = make_params(len(head_index), head_dim, mode, device, requires_grad=False)
    index = torch.tensor(head_index, device=device)

    out, z_selected = launchers.head_affine_forward(z, index, scale, offset, True)
    expected = head_affine_reference(z.double(), index, *(p.double() if p is not None else None
                                                          for p in (scale, offset)))
    assert_matches(out, expected, torch.float32, "forward output")
    if scale is not None and len(head_index) < num_heads:
        assert z_selected.shape == (3 * 67, len(head_index), head_dim)
        assert torch.equal(z_selected, z.view(-1, num_heads, head_dim)[:, index]), "z_selected"
    else:
        assert z_selected.numel() == 0

    saved = z if len(head_index) == num_heads else z_selected
    grad_z, grad_scale, grad_offset = launchers.head_affine_backward(
        grad_out, saved, index, scale, head_dim, True, scale is not None, offset is not None)
    ref_z = z.double().requires_grad_()
    ref_params = [p.double().requires_grad_() if p is not None else None for p in (scale, offset)]
    ref_out = head_affine_reference(ref_z, index, *ref_params)
    wanted = [ref_z] + [p for p in ref_params if p is not None]
    ref_grads = dict(zip(["z"] + [n for n, p in zip(["scale", "offset"], ref_params) if p is not None],
                         torch.autograd.grad(ref_out, wanted, grad_out.double())))
    if scale is None:
        assert grad_z is None and grad_scale is None  # the caller passes grad_out on as grad_z
    else:
        assert_matches(grad_z, ref_grads["z"], torch.float32, "grad_z")
        torch.testing.assert_close(grad_scale.double(), ref_grads["scale"], **PARAM_GRAD_TOL)
    if offset is None:
        assert grad_offset is None
    else:
        torch.testing.assert_close(grad_offset.double(), ref_grads["offset"], **PARAM_GRAD_TOL)


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.id for variant in VARIANTS])
def test_kernel_variant_matches_torch(variant, device, nan_filled_allocations):
    """Each launch of kernel_variants.VARIANTS (the list test_kernels_compile compiles for four GPU targets) on this
    process's kernels, into NaN-filled outputs, against the torch implementation run in fp64 on the same values."""
    launchers = nan_filled_allocations
    inputs = make_inputs(variant, device, seed=31)
    result = launch(launchers.KERNELS, variant, inputs)
    head_dim = variant.head_dim
    if variant.kernel == "forward":
        out, z_selected = result
        expected, _ = head_affine_torch_forward(inputs.z.double(), inputs.head_index, as_fp64(inputs.scale),
                                                as_fp64(inputs.offset), False, inputs.adapter_index)
        assert_matches(out, expected, variant.dtype, "forward output")
        heads = variant.heads
        if variant.scale and variant.save_selected and len(heads) < variant.num_heads:
            selected = inputs.z.reshape(-1, variant.num_heads, head_dim)[:, heads]
            assert torch.equal(z_selected, selected), "z_selected is not the selected heads of z"
        else:
            assert z_selected.numel() == 0
        return
    grad_z, grad_scale, grad_offset = result
    expected = head_affine_torch_backward(
        inputs.grad_out.double(), as_fp64(inputs.saved), inputs.head_index, as_fp64(inputs.scale), head_dim,
        variant.need_grad_z, variant.need_grad_scale, variant.need_grad_offset, inputs.adapter_index)
    assert (grad_z is None) == (expected[0] is None), "grad_z written when it should not be, or the reverse"
    if grad_z is not None:
        assert_matches(grad_z, expected[0], variant.dtype, "grad_z")
    # Token sums in fp32: allow for their rounding, which grows with the tokens summed.
    tokens = math.prod(variant.lead) // (variant.lead[0] if variant.routed else 1)
    for name, actual, wanted in (("scale", grad_scale, expected[1]), ("offset", grad_offset, expected[2])):
        assert (actual is None) == (wanted is None), f"grad of {name} present when it should not be, or the reverse"
        if actual is not None:
            assert actual.dtype == torch.float32 and actual.shape == wanted.shape
            torch.testing.assert_close(actual.double(), wanted, rtol=1e-4, atol=1e-5 * math.sqrt(tokens) + 1e-5,
                                       msg=lambda m: f"grad of {name}: {m}")


# Forward and backward on z and g laid out so that offsets pass element 2^31: "rows": batch rows 2^30 + 64 elements
# apart (row 2 starts past 2^31); "columns": channels 2^26 elements apart (channel 47 is past 2^31). With int32
# offsets they wrap to before the tensor. `big(n)` gives an fp16 tensor of n elements; `layout` names the case.
_FAR_ROWS = """
import torch
from lofit_fast.kernels.head_affine import KERNELS
from lofit_fast.ops import head_affine_torch_backward, head_affine_torch_forward

heads, head_dim = 3, 16
width = heads * head_dim
index, scale, offset = torch.tensor([2, 0]), torch.randn(2, head_dim), torch.randn(2, head_dim)
if layout == "rows":
    size, shape, strides = 2 * (2**30 + 64) + width, (3, 1, width), (2**30 + 64, width, 1)
else:
    size, shape, strides = (width - 1) * 2**26 + 2, (2, 1, width), (1, 1, 2**26)
z, g = (big(size).as_strided(shape, strides) for _ in range(2))
z.copy_(torch.randn(shape)), g.copy_(torch.randn(shape))
to_device = lambda t: t.to(z.device)
index, scale, offset = to_device(index), to_device(scale), to_device(offset)
out, z_selected = KERNELS.forward(z, index, scale, offset, True)
expected, expected_selected = head_affine_torch_forward(z.double(), index, scale.double(), offset.double(), True)
assert torch.equal(z_selected, expected_selected.half()), "z_selected"
assert (out.double() - expected).abs().max() < 1e-2, "forward"
grads = KERNELS.backward(g, z_selected, index, scale, head_dim, True, True, True)
wanted = head_affine_torch_backward(g.double(), z_selected.double(), index, scale.double(), head_dim, True, True, True)
for name, got, want in zip(("grad_z", "grad_scale", "grad_offset"), grads, wanted):
    assert (got.double() - want).abs().max() < 1e-2, name
print("far rows ok")
"""


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_offsets_past_2_31_elements(layout, device, tmp_path):
    """A few tokens spread over 4-6 GiB: the kernels' offsets into z and g are int64. On the CPU the storage is a
    sparse file (address space, a few pages touched), and the run is a subprocess: a read before the tensor (the
    int32 kernels did that) kills the process, not the test session. On a GPU, up to 13 GiB are allocated."""
    if device.type == "cuda":
        if torch.cuda.mem_get_info(device)[0] < 16 * 2**30:
            pytest.skip("needs 16 GiB of free GPU memory")
        namespace = dict(big=lambda n: torch.empty(n, dtype=torch.float16, device=device), layout=layout)
        exec(_FAR_ROWS, namespace)
        return
    setup = (f"import os, torch\n"
             f"layout = {layout!r}\n"
             f"def big(n):\n"
             f"    path = os.path.join({str(tmp_path)!r}, f'storage{{next(files)}}')\n"
             f"    with open(path, 'wb') as handle:\n"
             f"        handle.truncate(2 * n)\n"
             f"    return torch.from_file(path, shared=True, size=n, dtype=torch.float16)\n"
             f"files = iter(range(2))\n")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    try:
        result = subprocess.run([sys.executable, "-c", setup + _FAR_ROWS], env=environment, capture_output=True,
                                text=True, timeout=300)
    finally:
        for name in os.listdir(tmp_path):  # 4 GiB each as far as `ls` is concerned
            os.remove(os.path.join(tmp_path, name))
    assert result.returncode == 0 and "far rows ok" in result.stdout, (
        f"exit {result.returncode}: {result.stdout[-2000:]}{result.stderr[-2000:]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_nan_in_unselected_heads_stays_there(mode, backend, device):
    num_heads, head_dim, head_index = 5, 12, [3, 0]
    z = random_tensor((3, 67, num_heads * head_dim), torch.float32, device, seed=12)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=13)
    unselected = ~selected_columns(head_index, head_dim, num_heads).to(device)
    poisoned_tokens = torch.rand(z.shape[:-1], generator=torch.Generator().manual_seed(0)).to(device) < 0.3
    poison = poisoned_tokens[..., None] & unselected
    z = z.masked_fill(poison, float("nan")).requires_grad_()
    grad_out = grad_out.masked_fill(poison, float("nan"))
    scale, offset = make_params(len(head_index), head_dim, mode, device)
    index = torch.tensor(head_index, device=device)

    out = head_affine(z, index, scale, offset, backend=backend)
    assert torch.equal(out.isnan(), poison)
    params = [p for p in (scale, offset) if p is not None]
    grads = torch.autograd.grad(out, [z, *params], grad_out)
    assert torch.equal(grads[0].isnan(), poison)
    for grad in grads[1:]:
        assert grad.isfinite().all()
    # The selected heads do not see the NaNs at all: same values as with the poison zeroed.
    clean_z = z.detach().masked_fill(poison, 0.0).requires_grad_()
    clean_out = head_affine(clean_z, index, scale, offset, backend=backend)
    clean_grads = torch.autograd.grad(clean_out, [clean_z, *params], grad_out.masked_fill(poison, 0.0))
    assert torch.equal(out[~poison], clean_out[~poison])
    assert torch.equal(grads[0][~poison], clean_grads[0][~poison])
    for grad, clean in zip(grads[1:], clean_grads[1:]):
        assert torch.equal(grad, clean)


@pytest.mark.parametrize("mode", list(MODES))
def test_triton_backward_is_deterministic(mode, device):
    z = random_tensor((3, 67, 5 * 12), torch.float32, device, seed=14).requires_grad_()
    scale, offset = make_params(2, 12, mode, device)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=15)
    index = torch.tensor([4, 1], device=device)
    params = [p for p in (scale, offset) if p is not None]
    runs = []
    for _ in range(2):
        out = head_affine(z, index, scale, offset, backend="triton")
        runs.append(torch.autograd.grad(out, [z, *params], grad_out))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# What backward keeps
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_op_saves_only_selected_heads(backend, device):
    tokens, num_heads, head_dim, head_index = (2, 13), 5, 12, [4, 1]
    z = random_tensor((*tokens, num_heads * head_dim), torch.float32, device, seed=16)
    scale, offset = make_params(2, head_dim, "both", device)
    index = torch.tensor(head_index, device=device)
    out, z_selected = torch.ops.lofit_fast.head_affine(z, index, scale, offset, True, backend)
    assert z_selected.shape == (26, 2, head_dim)
    assert torch.equal(z_selected, z.view(26, num_heads, head_dim)[:, head_index])

    _, nothing = torch.ops.lofit_fast.head_affine(z, index, None, offset, True, backend)
    assert nothing.numel() == 0
    _, nothing = torch.ops.lofit_fast.head_affine(z, index, scale, offset, False, backend)
    assert nothing.numel() == 0
    every_head = torch.tensor([2, 0, 4, 1, 3], device=device)
    _, nothing = torch.ops.lofit_fast.head_affine(z, every_head, *make_params(5, head_dim, "both", device),
                                                  True, backend)
    assert nothing.numel() == 0, "with every head selected z itself is saved, not a copy"


def saved_for_backward(fn):
    """Shapes of the tensors autograd saves while running fn()."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_autograd_saves_no_more_than_needed(mode, backend, device):
    num_heads, head_dim, head_index = 5, 12, [4, 1]
    z = random_tensor((2, 13, num_heads * head_dim), torch.float32, device, seed=17).requires_grad_()
    scale, offset = make_params(2, head_dim, mode, device)
    index = torch.tensor(head_index, device=device)
    shapes = saved_for_backward(lambda: head_affine(z, index, scale, offset, backend=backend))
    largest = max(math.prod(shape) for shape in shapes)
    if scale is not None:
        assert (26, 2, head_dim) in shapes
        assert largest == 26 * 2 * head_dim
    else:
        assert largest <= 2 * head_dim, f"offset-only saved {shapes}"


# ----------------------------------------------------------------------------------------------
# Backend choice and bad arguments
# ----------------------------------------------------------------------------------------------

def test_triton_on_cpu_without_interpreter_names_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"), torch.float32)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu"), torch.float32) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "triton"


def test_unknown_backend(device):
    with pytest.raises(ValueError, match="'fastest'"):
        resolve_backend("fastest", device, torch.float32)
    z = torch.randn(3, 16, device=device)
    with pytest.raises(ValueError, match="'cuda'"):
        head_affine(z, torch.tensor([1], device=device), torch.randn(1, 8, device=device), backend="cuda")


def test_fp64_auto_falls_back_to_torch_and_triton_refuses(device):
    assert resolve_backend("auto", device, torch.float64) == "torch"
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("triton", device, torch.float64)


def test_neither_scale_nor_offset(device):
    with pytest.raises(ValueError, match="both are None"):
        head_affine(torch.randn(3, 16, device=device), torch.tensor([1], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_index, scale_shape, channels, message", [
    ([4], (1, 8), 32, r"heads in \[4, 4\], outside \[0, 4\)"),
    ([-1], (1, 8), 32, r"outside \[0, 4\)"),
    ([1, 1], (2, 8), 32, "names a head more than once"),
    ([1, 2], (1, 8), 32, "1 head slots .* head_index 2 heads"),
    ([1], (1, 8), 30, "not a whole number of heads"),
    ([[1]], (1, 8), 32, "1-D int64"),
], ids=["past the last head", "negative", "repeated", "K mismatch", "channels", "2-D index"])
def test_bad_head_index_or_shapes_are_refused_before_any_kernel_runs(head_index, scale_shape, channels, message,
                                                                     backend, device):
    z = torch.randn(3, channels, device=device)
    index = torch.tensor(head_index, device=device)
    with pytest.raises(ValueError, match=message):
        head_affine(z, index, torch.randn(scale_shape, device=device), backend=backend)


def test_head_index_dtype_device_and_scale_offset_agreement(device):
    z = torch.randn(3, 32, device=device)
    with pytest.raises(ValueError, match="1-D int64"):
        head_affine(z, torch.tensor([1.0], device=device), torch.randn(1, 8, device=device))
    with pytest.raises(ValueError, match="1-D int64"):
        head_affine(z, [1], torch.randn(1, 8, device=device))
    with pytest.raises(ValueError, match="same"):
        head_affine(z, torch.tensor([1], device=device), torch.randn(1, 8, device=device),
                    torch.randn(1, 16, device=device))
    # A validated index may skip the value check (the patched model's hooks do): shapes are still checked.
    with pytest.raises(ValueError, match="not a whole number"):
        head_affine(torch.randn(3, 30, device=device), torch.tensor([1], device=device),
                    torch.randn(1, 8, device=device), check_head_index=False)


# ----------------------------------------------------------------------------------------------
# Registration: fake (meta) kernel, autograd rule, tracing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("head_index", [[3, 1], [1, 0, 2, 3]], ids=["K=2", "K=all"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed batch/token"])
def test_opcheck_forward(layout, head_index, mode, backend, device):
    shape = (2, 5, 4 * 8)
    if layout == "contiguous":
        z = random_tensor(shape, torch.float32, device, seed=18)
    else:
        z = non_contiguous(layout, shape, torch.float32, device, seed=18)
    z.requires_grad_()
    scale, offset = make_params(len(head_index), 8, mode, device)
    index = torch.tensor(head_index, device=device)
    torch.library.opcheck(torch.ops.lofit_fast.head_affine.default,
                          (z, index, scale, offset, scale is not None, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_index", [[3, 1], [1, 0, 2, 3]], ids=["K=2", "K=all"])
def test_opcheck_backward(head_index, backend, device):
    shape = (2, 5, 4 * 8)
    grad_out = non_contiguous("transposed batch/token", shape, torch.float32, device, seed=19)
    z = random_tensor(shape, torch.float32, device, seed=20)
    index = torch.tensor(head_index, device=device)
    saved = z if len(head_index) == 4 else z.view(10, 4, 8)[:, index].contiguous()
    scale, _ = make_params(len(head_index), 8, "scale", device, requires_grad=False)
    for flags in [(True, True, True), (False, True, False), (True, False, True)]:
        torch.library.opcheck(torch.ops.lofit_fast.head_affine_backward.default,
                              (grad_out, saved, index, scale, 8, *flags, backend))
    torch.library.opcheck(torch.ops.lofit_fast.head_affine_backward.default,
                          (grad_out, saved, index, None, 8, True, False, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_index", [[3, 1], [1, 0, 2, 3]], ids=["K=2", "K=all"])
def test_compiled_gradients_match_eager(head_index, backend, device):
    """Scale and offset gradients through AOTAutograd are the eager ones, each for its own parameter."""
    z = random_tensor((2, 5, 4 * 8), torch.float32, device, seed=21).requires_grad_()
    scale, offset = make_params(len(head_index), 8, "both", device)
    index = torch.tensor(head_index, device=device)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=22)

    def loss(z, scale, offset):
        return (head_affine(z, index, scale, offset, backend=backend) * grad_out).sum()

    eager = torch.autograd.grad(loss(z, scale, offset), [z, scale, offset])
    torch._dynamo.reset()
    try:
        compiled_loss = torch.compile(loss, backend="aot_eager", fullgraph=True)
        compiled = torch.autograd.grad(compiled_loss(z, scale, offset), [z, scale, offset])
    finally:
        torch._dynamo.reset()
    for name, a, b in zip(("z", "scale", "offset"), eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
