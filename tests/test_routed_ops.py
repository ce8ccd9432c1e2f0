"""`lofit_fast::head_affine` with `adapter_index`: many adapters in one batch, on both backends.

Each batch row of z (dim 0) uses its own adapter, scale / offset (A, K, head_dim), or none (-1). Every
check draws fresh random z, parameters and upstream gradient (never zeros), runs the op on the "torch"
and the "triton" backend (interpreted on the CPU, see conftest.py) and compares the output and the
gradients of z, scale and offset with `head_affine_reference(..., adapter_index=...)` in fp64, which
runs the single-adapter reference row by row.
"""

import importlib

import pytest
import torch
from test_ops import (
    MODES,
    PARAM_GRAD_TOL,
    as_fp64,
    assert_matches,
    nan_filled_allocations,  # noqa: F401  (a fixture: pytest finds it in this module)
    random_tensor,
    run_and_compare,
    saved_for_backward,
    selected_columns,
)

from lofit_fast.ops import head_affine, head_affine_reference

BACKENDS = ["torch", "triton"]
NUM_ADAPTERS = 4  # the default adapter_index [2, -1, 0] leaves adapters 1 and 3 unused

# (name, leading shape of z (batch first), num_heads, head_dim, head_index)
SHAPES = [
    ("decode 3x1", (3, 1), 5, 12, [3, 0]),
    ("3x67 head_dim 80", (3, 67), 5, 80, [1, 3]),
    ("2d z (3 rows)", (3,), 5, 12, [4, 2]),
    ("4d z", (3, 2, 5), 5, 12, [2]),
    ("K=all out of order", (3, 9), 5, 12, [2, 0, 4, 1, 3]),
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def make_adapter_params(num_adapters, num_selected, head_dim, mode, device, seed=0, requires_grad=True):
    """Random fp32 (scale, offset), each (A, K, head_dim), for `mode`; the one it leaves out is None."""
    generator = torch.Generator().manual_seed(seed + 2000)
    has_scale, has_offset = MODES[mode]

    def param():
        value = torch.randn(num_adapters, num_selected, head_dim, generator=generator).to(device)
        return value.requires_grad_(requires_grad)

    return (param() if has_scale else None), (param() if has_offset else None)


def run_routed_and_compare(z, head_index, adapter_index, scale, offset, backend, grad_out=None, seed=1):
    """`run_and_compare` with one adapter per batch row (see there)."""
    return run_and_compare(z, head_index, scale, offset, backend, grad_out=grad_out, seed=seed,
                           adapter_index=adapter_index)


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", SHAPES, ids=[case[0] for case in SHAPES])
def test_fp32_matches_reference(case, mode, backend, device):
    _, lead, num_heads, head_dim, head_index = case
    z = random_tensor((*lead, num_heads * head_dim), torch.float32, device, seed=0).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, len(head_index), head_dim, mode, device)
    run_routed_and_compare(z, head_index, [2, -1, 0], scale, offset, backend)


# bf16 / fp16 z with fp32 parameters: within 1 ulp of the exact value (see assert_matches in test_ops).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_index", [[1, 3], [2, 0, 3, 4, 1]], ids=["K=2", "K=all"])
def test_low_precision_z_with_fp32_params(head_index, dtype, backend, device):
    z = random_tensor((3, 33, 5 * 12), dtype, device, seed=4).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, len(head_index), 12, "both", device)
    run_routed_and_compare(z, head_index, [3, 0, -1], scale, offset, backend)


@pytest.mark.parametrize("head_index", [[4, 2], [2, 0, 3, 4, 1]], ids=["K=2", "K=all"])
def test_fp64_on_torch_is_exact(head_index, device):
    z = random_tensor((3, 11, 5 * 7), torch.float64, device, seed=9).requires_grad_()
    scale, offset = (p.detach().double().requires_grad_()
                     for p in make_adapter_params(NUM_ADAPTERS, len(head_index), 7, "both", device))
    index, adapters = torch.tensor(head_index, device=device), torch.tensor([1, -1, 1], device=device)
    out = head_affine(z, index, scale, offset, backend="auto", adapter_index=adapters)
    expected = head_affine_reference(z, index, scale, offset, adapter_index=adapters)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = random_tensor(z.shape, torch.float64, device, seed=10)
    for grad, expected_grad in zip(torch.autograd.grad(out, [z, scale, offset], g),
                                   torch.autograd.grad(expected, [z, scale, offset], g)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_index", [[3, 1], [2, 0, 3, 1]], ids=["K=2", "K=all"])
def test_non_contiguous_z_and_grad(head_index, backend, device):
    """z is every other token of a longer tensor; the upstream gradient has batch and tokens transposed."""
    z = random_tensor((3, 46, 4 * 12), torch.float32, device, seed=5)[:, ::2].requires_grad_()
    grad_out = random_tensor((23, 3, 4 * 12), torch.float32, device, seed=6).transpose(0, 1)
    assert not z.is_contiguous() and not grad_out.is_contiguous()
    scale, offset = make_adapter_params(NUM_ADAPTERS, len(head_index), 12, "both", device)
    adapters = torch.tensor([0, 3, -1], dtype=torch.int32)  # int32 is accepted as well as int64
    run_routed_and_compare(z, head_index, adapters, scale, offset, backend, grad_out=grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_every_row_without_adapter_is_identity(dtype, backend, device):
    """All rows -1: z' is z bit for bit (signed zeros too), grad_z is g, and every adapter's gradient is 0."""
    z = random_tensor((3, 5, 5 * 12), torch.float32, device, seed=7)
    z[1, 2, :7] = -0.0
    z.requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 12, "both", device)
    adapters = torch.full((3,), -1, dtype=dtype, device=device)
    out = head_affine(z, torch.tensor([1, 4], device=device), scale, offset, backend=backend,
                      adapter_index=adapters)
    assert torch.equal(out, z) and torch.equal(out.signbit(), z.signbit())
    g = random_tensor(z.shape, torch.float32, device, seed=8)
    grad_z, grad_scale, grad_offset = torch.autograd.grad(out, [z, scale, offset], g)
    assert torch.equal(grad_z, g)
    assert torch.equal(grad_scale, torch.zeros_like(scale)) and torch.equal(grad_offset, torch.zeros_like(offset))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_z_without_grad_rows_split_into_chunks(mode, backend, device, monkeypatch):
    """The lowest patched layer (no grad_z), with rows of 70 tokens: chunks of 32 tokens cut each row into three,
    the last one clipped at the row's end, not at a tile boundary."""
    if backend == "triton":
        launchers = importlib.import_module("lofit_fast.kernels.head_affine")
        monkeypatch.setattr(launchers, "_tokens_per_program", lambda tokens_per_row, rows, columns, processors: 32)
    z = random_tensor((3, 70, 5 * 12), torch.float32, device, seed=11)
    scale, offset = make_adapter_params(NUM_ADAPTERS, 1, 12, mode, device)
    run_routed_and_compare(z, [2], [1, 1, 3], scale, offset, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("head_index", [[4, 1], [1, 0, 2, 4, 3]], ids=["K=2", "K=all"])
def test_one_adapter_equals_the_plain_op(head_index, mode, backend, device):
    """A = 1 and every row on adapter 0 is the op without adapter_index: same output, same gradients up to
    the order of the token sums."""
    z = random_tensor((3, 13, 5 * 12), torch.float32, device, seed=12).requires_grad_()
    scale, offset = make_adapter_params(1, len(head_index), 12, mode, device)
    params = [p for p in (scale, offset) if p is not None]
    index, g = torch.tensor(head_index, device=device), random_tensor(z.shape, torch.float32, device, seed=13)
    every_row_on_0 = torch.zeros(3, dtype=torch.long, device=device)
    routed = head_affine(z, index, scale, offset, backend=backend, adapter_index=every_row_on_0)
    # The plain op on adapter 0's (K, D) block: a view, so its gradients land in (1, K, D) as well.
    plain = head_affine(z, index, *(p[0] if p is not None else None for p in (scale, offset)), backend=backend)
    assert torch.equal(routed, plain)
    # The sums split the tokens differently (chunks of one row vs of all rows): fp32 rounding of sums of 39
    # terms of size ~1 in another order, a few 1e-6.
    for a, b in zip(torch.autograd.grad(routed, [z, *params], g), torch.autograd.grad(plain, [z, *params], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(3, 0), (0, 4)], ids=["no tokens", "no rows"])
def test_empty_batch(lead, backend, device):
    z = torch.empty(*lead, 4 * 8, device=device).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 8, "both", device)
    adapters = torch.tensor([0, -1, 3][:lead[0]], dtype=torch.long, device=device)
    out = head_affine(z, torch.tensor([3, 0], device=device), scale, offset, backend=backend, adapter_index=adapters)
    assert out.shape == z.shape
    grads = torch.autograd.grad(out, [z, scale, offset], torch.empty_like(out))
    assert grads[0].shape == z.shape
    assert torch.equal(grads[1], torch.zeros_like(scale)) and torch.equal(grads[2], torch.zeros_like(offset))


def test_triton_backward_is_deterministic(device):
    z = random_tensor((3, 20, 5 * 12), torch.float32, device, seed=14).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 12, "both", device)
    index, adapters = torch.tensor([4, 1], device=device), torch.tensor([3, 0, 3], device=device)
    g = random_tensor(z.shape, torch.float32, device, seed=15)
    runs = [torch.autograd.grad(head_affine(z, index, scale, offset, backend="triton", adapter_index=adapters),
                                [z, scale, offset], g) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# Kernels write every element they return; backward keeps only the selected heads
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_index, mode", [([1, 4], "scale"), ([1, 4], "offset"), ([1, 4], "both"),
                                              ([2, 0, 3, 4, 1], "both")], ids=["K=2-scale", "K=2-offset",
                                                                             "K=2-both", "K=all-both"])
def test_launchers_write_every_element(head_index, mode, device, nan_filled_allocations, monkeypatch):  # noqa: F811
    """NaN-filled allocations; rows of 70 tokens cut into backward chunks of 32 tokens, the last clipped at the
    row's end (token 70 is not a tile boundary). The launchers return sums per batch row, (B, K, D)."""
    launchers = nan_filled_allocations
    monkeypatch.setattr(launchers, "_tokens_per_program", lambda tokens_per_row, rows, columns, processors: 32)
    num_heads, head_dim = 5, 12
    z = random_tensor((3, 70, num_heads * head_dim), torch.float32, device, seed=16)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=17)
    scale, offset = make_adapter_params(NUM_ADAPTERS, len(head_index), head_dim, mode, device, requires_grad=False)
    index, adapters = torch.tensor(head_index, device=device), torch.tensor([2, -1, 0], device=device)

    out, z_selected = launchers.head_affine_forward(z, index, scale, offset, True, adapters)
    expected = head_affine_reference(z.double(), index, as_fp64(scale), as_fp64(offset), adapter_index=adapters)
    assert_matches(out, expected, torch.float32, "forward output")
    if scale is not None and len(head_index) < num_heads:
        assert torch.equal(z_selected, z.view(-1, num_heads, head_dim)[:, index]), "z_selected"
    else:
        assert z_selected.numel() == 0

    saved = z if len(head_index) == num_heads else z_selected
    grad_z, grad_scale, grad_offset = launchers.head_affine_backward(
        grad_out, saved, index, scale, head_dim, True, scale is not None, offset is not None, adapters)
    # Each row's sums are the single-adapter gradients of that row alone (here with the row's own params).
    for row, adapter in enumerate(adapters.tolist()):
        row_params = [None if p is None else p[max(adapter, 0)].double().requires_grad_() for p in (scale, offset)]
        ref_z = z[row].double().requires_grad_()
        ref_out = head_affine_reference(ref_z, index, *row_params) if adapter >= 0 else ref_z * 1
        wanted = [ref_z] + [p for p in row_params if p is not None]
        ref_grads = torch.autograd.grad(ref_out, wanted, grad_out[row].double(), allow_unused=True)
        if scale is None:
            assert grad_z is None and grad_scale is None
        else:
            assert_matches(grad_z[row], ref_grads[0], torch.float32, f"grad_z of row {row}")
            if adapter >= 0:
                torch.testing.assert_close(grad_scale[row].double(), ref_grads[1], **PARAM_GRAD_TOL)
        if offset is not None and adapter >= 0:
            torch.testing.assert_close(grad_offset[row].double(), ref_grads[-1], **PARAM_GRAD_TOL)
    for grad in (grad_scale, grad_offset):
        assert grad is None or (grad.shape == (3, len(head_index), head_dim) and grad.isfinite().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_rows_without_adapter_stays_there(backend, device):
    """NaN in every head of a -1 row and in unselected heads: they reach z' and grad_z only where they were,
    and never the parameter gradients."""
    num_heads, head_dim, head_index = 5, 12, [3, 0]
    z = random_tensor((3, 67, num_heads * head_dim), torch.float32, device, seed=18)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=19)
    poison = torch.zeros(z.shape, dtype=torch.bool, device=device)
    poison[1] = torch.rand(z.shape[1:], generator=torch.Generator().manual_seed(0)).to(device) < 0.3
    poison[0, ::3] = ~selected_columns(head_index, head_dim, num_heads).to(device)
    z = z.masked_fill(poison, float("nan")).requires_grad_()
    grad_out = grad_out.masked_fill(poison, float("nan"))
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, head_dim, "both", device)
    out = head_affine(z, torch.tensor(head_index, device=device), scale, offset, backend=backend,
                      adapter_index=torch.tensor([0, -1, 2], device=device))
    assert torch.equal(out.isnan(), poison)
    grad_z, grad_scale, grad_offset = torch.autograd.grad(out, [z, scale, offset], grad_out)
    assert torch.equal(grad_z.isnan(), poison)
    assert grad_scale.isfinite().all() and grad_offset.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_saves_only_selected_heads(backend, device):
    z = random_tensor((2, 13, 5 * 12), torch.float32, device, seed=20).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 12, "both", device)
    index, adapters = torch.tensor([4, 1], device=device), torch.tensor([0, 3], device=device)
    shapes = saved_for_backward(lambda: head_affine(z, index, scale, offset, backend=backend,
                                                    adapter_index=adapters))
    assert (26, 2, 12) in shapes
    assert max(torch.Size(shape).numel() for shape in shapes) == 26 * 2 * 12


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [[0, 4, 1], [0, -2, 1]], ids=["A", "-2"])
def test_adapter_index_out_of_range(bad, backend, device):
    z = random_tensor((3, 2, 5 * 12), torch.float32, device, seed=21)
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 12, "both", device)
    with pytest.raises(ValueError, match=r"outside \[-1, 4\)"):
        head_affine(z, torch.tensor([1, 3], device=device), scale, offset, backend=backend,
                    adapter_index=torch.tensor(bad, device=device))


def test_unchecked_index_reads_no_range_and_nothing_outside(device, monkeypatch):
    """check_adapter_index=False (an index validated once, as a route is): the op never reads the index's range,
    which would sync the device, and the kernels read nothing outside scale / offset, so a row whose entry is out
    of range passes through unchanged in forward and backward, as with -1."""
    from lofit_fast import ops

    monkeypatch.setattr(ops, "_check_adapter_index_range", lambda *args: pytest.fail("the range was read"))
    z = random_tensor((3, 6, 5 * 12), torch.float32, device, seed=27).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 12, "both", device)
    index = torch.tensor([1, 3], device=device)
    def run(rows):
        return head_affine(z, index, scale, offset, backend="triton", check_adapter_index=False,
                           adapter_index=torch.tensor(rows, device=device))

    out, expected = run([2, 9, -1]), run([2, -1, -1])
    assert torch.equal(out, expected)
    g = random_tensor(z.shape, torch.float32, device, seed=28)
    inputs = [z, scale, offset]
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)):
        assert torch.equal(a, b)


def test_bad_adapter_index_and_param_shapes(device):
    z = random_tensor((3, 2, 5 * 12), torch.float32, device, seed=22)
    index = torch.tensor([1, 3], device=device)
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 12, "both", device)
    adapters = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match=r"one adapter per row of z along dim 0"):
        head_affine(z, index, scale, offset, adapter_index=adapters[:2])
    with pytest.raises(ValueError, match=r"at least 2 dims"):
        head_affine(z[0, 0], index, scale, offset, adapter_index=adapters[:1])
    with pytest.raises(ValueError, match="int64"):
        head_affine(z, index, scale, offset, adapter_index=adapters.float())
    with pytest.raises(ValueError, match="int64"):
        head_affine(z, index, scale, offset, adapter_index=[0, 1, 2])
    with pytest.raises(ValueError, match=r"\(adapters, K, head_dim\)"):
        head_affine(z, index, scale[0], adapter_index=adapters)
    with pytest.raises(ValueError, match="together with adapter_index"):
        head_affine(z, index, scale, offset)
    with pytest.raises(ValueError, match="same adapters"):
        head_affine(z, index, scale, offset[:2], adapter_index=adapters)


# ----------------------------------------------------------------------------------------------
# Registration: fake (meta) kernels, autograd rule, tracing
# ----------------------------------------------------------------------------------------------

# Fake and real kernels agree in both backends. The dynamic-shape AOT check (the slow one) runs on the torch
# backend only: it traces the fake kernels, which are the same for both.
@pytest.mark.parametrize("backend, head_index", [("torch", [3, 1]), ("triton", [1, 0, 2, 3])],
                         ids=["torch-K=2", "triton-K=all"])
def test_opcheck(backend, head_index, device):
    checks = dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor")) \
        if backend == "triton" else {}
    z = random_tensor((3, 5, 4 * 8), torch.float32, device, seed=23).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, len(head_index), 8, "both", device)
    index, adapters = torch.tensor(head_index, device=device), torch.tensor([2, -1, 0], device=device)
    torch.library.opcheck(torch.ops.lofit_fast.head_affine.default,
                          (z, index, scale, offset, True, backend, adapters), **checks)
    saved = z.detach() if len(head_index) == 4 else z.detach().view(15, 4, 8)[:, index].contiguous()
    grad_out = random_tensor(z.shape, torch.float32, device, seed=24)
    for param, flags in [(scale.detach(), (True, True, True)), (None, (False, False, True))]:
        torch.library.opcheck(torch.ops.lofit_fast.head_affine_backward.default,
                              (grad_out, saved, index, param, 8, *flags, backend, adapters, NUM_ADAPTERS), **checks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_gradients_match_eager(backend, device):
    """fullgraph with aot_eager in the routed mode: same gradients as eager, and the range check still runs
    (it lives in the op, which the compiler does not trace into)."""
    z = random_tensor((3, 5, 4 * 8), torch.float32, device, seed=25).requires_grad_()
    scale, offset = make_adapter_params(NUM_ADAPTERS, 2, 8, "both", device)
    index = torch.tensor([3, 1], device=device)
    grad_out = random_tensor(z.shape, torch.float32, device, seed=26)

    def loss(z, scale, offset, adapters):
        return (head_affine(z, index, scale, offset, backend=backend, adapter_index=adapters) * grad_out).sum()

    adapters = torch.tensor([2, -1, 0], device=device)
    eager = torch.autograd.grad(loss(z, scale, offset, adapters), [z, scale, offset])
    torch._dynamo.reset()
    try:
        compiled_loss = torch.compile(loss, backend="aot_eager", fullgraph=True)
        compiled = torch.autograd.grad(compiled_loss(z, scale, offset, adapters), [z, scale, offset])
        with pytest.raises(ValueError, match="outside"):
            compiled_loss(z, scale, offset, torch.tensor([2, 7, 0], device=device))
    finally:
        torch._dynamo.reset()
    for name, a, b in zip(("z", "scale", "offset"), eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
