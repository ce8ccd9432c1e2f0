"""`patch_model` on tiny Hugging Face models, checked against the independent per-head reference hook.

Each check patches a model, sets random non-zero scales and offsets, and compares logits and the
gradients of the LoFiT parameters with a deep copy of the same model carrying
`helpers.reference_hook_patch` (plain torch, a loop over heads). Both backends run: "triton" is the
compiled kernels on a GPU and the interpreted ones on the CPU (see conftest.py).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lofit_fast
from lofit_fast import ops, patch_model, register_architecture
from lofit_fast import patch as patch_module

from helpers import decoder_o_projs, reference_hook_patch

BACKENDS = ["torch", "triton"]
BUILT_IN_ARCHITECTURES = sorted(lofit_fast.ARCHITECTURES)
HEADS = [(2, 4), (0, 1), (2, 0), (1, 5)]  # deliberately out of order, two heads in layer 2
MODES = {"both": dict(scale=True, offset=True), "offset": dict(scale=False, offset=True),
         "scale": dict(scale=True, offset=False)}

# fp32 models: LoFiT computes the same fp32 values as the reference hook, but the offset-only path
# enters through o_proj's output (W v added after the matmul), which rounds differently.
LOGITS_TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def left_padded_batch(device, seed=0, length=9, vocab=97):
    """Two rows; the second has three pad tokens (id 0) on the left, masked out."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids.to(device), mask.to(device)


def randomize(handle, seed=0, magnitude=0.5):
    """Random non-zero LoFiT parameters (under no_grad); returns detached copies that require grad,
    for the reference hook."""
    handle.lofit.initialize(magnitude, seed)
    return [None if param is None else param.detach().clone().requires_grad_()
            for param in (handle.scale, handle.offset)]


def loss_of(logits, mask, seed=1):
    """A random linear function of the logits at the unmasked positions: a random upstream gradient."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits)
    return (logits * weights)[mask.bool()].float().sum()


def assert_grads_close(actual, expected, what, rel=1e-4):
    assert actual is not None, f"{what}: no gradient"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def patched_and_reference(model, heads, backend="auto", mode="both", seed=0):
    """(handle on model, reference copy of model, reference scale, reference offset)."""
    reference = copy.deepcopy(model)
    handle = patch_model(model, heads=heads, backend=backend, **MODES[mode])
    ref_scale, ref_offset = randomize(handle, seed=seed)
    reference_hook_patch(reference, handle.heads, ref_scale, ref_offset)
    return handle, reference, ref_scale, ref_offset


def compare_with_reference(model, heads, device, backend="auto", mode="both", logits_tol=LOGITS_TOL,
                           grad_rel=1e-4):
    handle, reference, ref_scale, ref_offset = patched_and_reference(model, heads, backend, mode)
    ids, mask = left_padded_batch(device)
    valid = mask.bool()
    logits = model(ids, attention_mask=mask).logits
    expected = reference(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[valid], expected[valid], **logits_tol)
    with torch.no_grad(), handle.disabled():
        base = model(ids, attention_mask=mask).logits
    effect = (base[valid].float() - expected[valid].float()).abs().max().item()
    assert effect > 20 * logits_tol["atol"], f"LoFiT barely changes the logits ({effect:.3g}): weak test"

    loss_of(logits, mask).backward()
    loss_of(expected, mask).backward()
    for name, param, ref_param in (("scale", handle.scale, ref_scale), ("offset", handle.offset, ref_offset)):
        if ref_param is not None:
            assert param.grad.dtype == torch.float32
            assert_grads_close(param.grad, ref_param.grad, f"grad of {name}", rel=grad_rel)
    return handle


# ----------------------------------------------------------------------------------------------
# Same function as the reference, on every architecture
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", BUILT_IN_ARCHITECTURES)
def test_matches_reference_on_every_architecture(model_type, backend, make_tiny_model, device):
    """Scale and offset, four heads out of order, a left-padded batch with its attention mask."""
    compare_with_reference(make_tiny_model(model_type), HEADS, device, backend=backend)


@pytest.mark.parametrize("model_type", BUILT_IN_ARCHITECTURES)
def test_offset_only_matches_reference_on_every_architecture(model_type, make_tiny_model, device):
    """Offsets alone take the folded path (W v added to o_proj's output)."""
    compare_with_reference(make_tiny_model(model_type), HEADS, device, mode="offset")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", ["every head", "o_proj with bias", "heads*head_dim == hidden"])
def test_matches_reference_llama_variants(variant, mode, backend, make_tiny_model, device):
    if variant == "every head":
        model, heads = make_tiny_model("llama"), None
    elif variant == "o_proj with bias":
        model, heads = make_tiny_model("llama", attention_bias=True), HEADS
        with torch.no_grad():
            for o_proj in decoder_o_projs(model):
                o_proj.bias.normal_()
    else:
        model, heads = make_tiny_model("llama", head_dim=None), HEADS
        assert decoder_o_projs(model)[0].in_features == model.config.hidden_size
    handle = compare_with_reference(model, heads, device, backend=backend, mode=mode)
    if heads is None:
        assert handle.heads == [(layer, head) for layer in range(3) for head in range(6)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model_with_fp32_master_weights(backend, make_tiny_model, device):
    model = make_tiny_model("llama").to(torch.bfloat16)
    handle = compare_with_reference(
        model, HEADS, device, backend=backend,
        # bf16 activations: the interpreter rounds z' by truncation, the reference to nearest; an ulp
        # here and there in z' moves the logits (|logits| < 0.5) by a few bf16 ulps (2^-9 at 0.37).
        logits_tol=dict(rtol=1e-2, atol=1e-2), grad_rel=2e-2)
    assert handle.scale.dtype == handle.offset.dtype == torch.float32
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("lofit.")} == {torch.bfloat16}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3"])
def test_greedy_generate_with_kv_cache_matches_reference(model_type, backend, make_tiny_model, device):
    model = make_tiny_model(model_type)
    handle, reference, _, _ = patched_and_reference(model, HEADS, backend)
    ids, mask = left_padded_batch(device, seed=3, length=6)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True,
                    return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, **settings)
        expected = reference.generate(ids, **settings)
        with handle.disabled():
            base = model.generate(ids, **settings)
    assert torch.equal(out.sequences, expected.sequences)
    assert out.sequences.shape[1] > ids.shape[1]
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), **LOGITS_TOL)
    steps = min(len(base.logits), len(out.logits))
    effect = (torch.stack(base.logits[:steps]) - torch.stack(out.logits[:steps])).abs().max().item()
    assert effect > 1e-2, "LoFiT barely changes the generation logits: weak test"


# ----------------------------------------------------------------------------------------------
# Heads, rows and parameters
# ----------------------------------------------------------------------------------------------

def o_proj_inputs(model):
    """Run-time capture of every layer's o_proj input (after LoFiT, whose pre-hook runs first)."""
    captured = {}
    hooks = [o_proj.register_forward_pre_hook(
        lambda module, args, layer=layer: captured.__setitem__(layer, args[0].detach().clone()))
        for layer, o_proj in enumerate(decoder_o_projs(model))]
    return captured, hooks


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_order_and_row_mapping(backend, make_tiny_model, device):
    """Row i of scale / offset acts on heads[i] and nowhere else, whatever the order of heads."""
    model = make_tiny_model("llama")
    heads = [(2, 1), (0, 5), (2, 0), (1, 3), (0, 0)]
    handle = patch_model(model, heads=heads, backend=backend)
    assert handle.heads == heads
    assert handle.scale.shape == handle.offset.shape == (len(heads), 12)
    captured, hooks = o_proj_inputs(model)
    ids, _ = left_padded_batch(device)
    with torch.no_grad():
        model(ids)
    base = dict(captured)
    generator = torch.Generator().manual_seed(0)
    for row, (layer, head) in enumerate(heads):
        for which in ("scale", "offset"):
            vector = torch.randn(12, generator=generator).to(device)
            with torch.no_grad():
                handle.scale.zero_()
                handle.offset.zero_()
                getattr(handle, which)[row] = vector
                model(ids)
            for lower in range(layer):
                assert torch.equal(captured[lower], base[lower]), f"row {row} changed layer {lower}"
            change = (captured[layer] - base[layer]).unflatten(-1, (6, 12))
            others = [h for h in range(6) if h != head]
            assert torch.equal(change[..., others, :], torch.zeros_like(change[..., others, :])), \
                f"row {row} ({which}) changed other heads of layer {layer}"
            base_head = base[layer].unflatten(-1, (6, 12))[..., head, :]
            wanted = base_head * vector if which == "scale" else vector.expand_as(base_head)
            torch.testing.assert_close(change[..., head, :], wanted, rtol=1e-5, atol=1e-6)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("mode", list(MODES))
def test_parameters_registered_and_base_frozen(mode, make_tiny_model):
    model = make_tiny_model("llama").to(torch.bfloat16)
    names_before = [name for name, _ in model.named_parameters()]
    state_before = set(model.state_dict())
    handle = patch_model(model, heads=HEADS, **MODES[mode])
    lofit_names = [f"lofit.{name}" for name in ("scale", "offset") if MODES[mode][name]]
    params = dict(model.named_parameters())
    assert list(params) == names_before + lofit_names
    assert [name for name, p in params.items() if p.requires_grad] == lofit_names
    for name in lofit_names:
        assert params[name].dtype == torch.float32
        assert params[name].shape == (len(HEADS), 12)
        assert params[name] is getattr(handle, name.split(".")[1])
        assert torch.equal(params[name], torch.zeros_like(params[name]))
    assert set(model.state_dict()) - state_before == set(lofit_names)
    for name in ("scale", "offset"):
        if not MODES[mode][name]:
            assert getattr(handle, name) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_init_is_identity(dtype, mode, backend, make_tiny_model, device):
    model = make_tiny_model("gemma").to(dtype)
    ids, mask = left_padded_batch(device)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    patch_model(model, heads=HEADS, backend=backend, **MODES[mode])
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
    assert torch.equal(patched, base)


# ----------------------------------------------------------------------------------------------
# Switching off and taking out
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("frozen_before", [False, True], ids=["all trainable", "some frozen"])
def test_remove_restores_the_model_exactly(frozen_before, mode, make_tiny_model, device):
    model = make_tiny_model("qwen3")
    if frozen_before:
        model.model.embed_tokens.weight.requires_grad_(False)
        for param in model.model.layers[0].mlp.parameters():
            param.requires_grad_(False)
    flags_before = [(name, p.requires_grad) for name, p in model.named_parameters()]
    buffers_before = [name for name, _ in model.named_buffers()]
    ids, mask = left_padded_batch(device)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits

    handle = patch_model(model, heads=HEADS, **MODES[mode])
    randomize(handle)
    logits = model(ids, attention_mask=mask).logits
    loss_of(logits, mask).backward()
    assert not torch.equal(logits, base)

    assert handle.remove() is model
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == flags_before
    assert [name for name, _ in model.named_buffers()] == buffers_before
    assert not hasattr(model, "lofit")
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base)
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    # And the model can be patched again.
    again = patch_model(model, heads=HEADS, **MODES[mode])
    assert again.heads == HEADS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_disabled_gives_base_logits(mode, backend, make_tiny_model, device):
    model = make_tiny_model("mistral")
    ids, mask = left_padded_batch(device)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    handle = patch_model(model, heads=HEADS, backend=backend, **MODES[mode])
    randomize(handle)
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
        with handle.disabled() as same_model:
            assert same_model is model
            assert torch.equal(model(ids, attention_mask=mask).logits, base)
        assert torch.equal(model(ids, attention_mask=mask).logits, patched)
    assert not torch.equal(patched, base)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

BAD_HEADS = [
    ([(3, 0)], ValueError, r"layer 3 is out of range"),
    ([(-1, 0)], ValueError, r"layer -1 is out of range"),
    ([(0, 6)], ValueError, r"head 6 is out of range"),
    ([(1, -2)], ValueError, r"head -2 is out of range"),
    ([(1, 2), (0, 0), (1, 2)], ValueError, r"\(1, 2\) is listed twice"),
    ([], ValueError, r"heads is empty"),
    ("0,1", TypeError, r"not str"),
    (7, TypeError, r"not int"),
    ([(0,)], TypeError, r"\(0,\)"),
    ([(0, 1, 2)], TypeError, r"\(0, 1, 2\)"),
    ([("a", 1)], TypeError, r"\('a', 1\)"),
]


def assert_untouched(model, flags):
    assert not hasattr(model, "lofit")
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == flags


@pytest.mark.parametrize("heads, error, message", BAD_HEADS, ids=[repr(case[0]) for case in BAD_HEADS])
def test_bad_heads(heads, error, message, make_tiny_model):
    model = make_tiny_model("llama")
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    with pytest.raises(error, match=message):
        patch_model(model, heads=heads)
    assert_untouched(model, flags)


def test_bad_options(make_tiny_model, monkeypatch, device):
    model = make_tiny_model("llama")
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    with pytest.raises(ValueError, match="scale and offset are both off"):
        patch_model(model, heads=HEADS, scale=False, offset=False)
    with pytest.raises(ValueError, match="'cuda_fast'"):
        patch_model(model, heads=HEADS, backend="cuda_fast")
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            patch_model(model, heads=HEADS, backend="triton")
    with pytest.raises(TypeError, match="not str"):
        patch_model("llama", heads=HEADS)
    assert_untouched(model, flags)


def test_patching_a_patched_model(make_tiny_model):
    model = make_tiny_model("llama")
    handle = patch_model(model, heads=HEADS)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, heads=[(0, 0)])
    assert handle.lofit is model.lofit and handle.heads == HEADS


def test_unknown_architecture_points_to_register_architecture(make_tiny_model):
    model = make_tiny_model("llama")
    model.config.model_type = "made_up_llama"
    with pytest.raises(ValueError, match=r"'made_up_llama'.*register_architecture"):
        patch_model(model, heads=HEADS)
    plain = nn.Linear(4, 4)
    plain.config = SimpleNamespace(model_type="made_up_module")
    with pytest.raises(ValueError, match=r"'made_up_module'.*register_architecture"):
        patch_model(plain)
    with pytest.raises(ValueError, match=r"None.*register_architecture"):
        patch_model(nn.Linear(4, 4))


class _TinyBlock(nn.Module):
    def __init__(self, hidden, heads, head_dim):
        super().__init__()
        self.mix = nn.Linear(hidden, heads * head_dim)
        self.attn_out = nn.Linear(heads * head_dim, hidden)

    def forward(self, x):
        return x + self.attn_out(torch.tanh(self.mix(x)))


class _TinyCustomLM(nn.Module):
    """Not a Hugging Face model: layers at `trunk.blocks`, the output projection at `attn_out`."""

    def __init__(self, vocab=31, hidden=16, layers=3, heads=4, head_dim=5):
        super().__init__()
        self.config = SimpleNamespace(model_type="tiny_custom_lm", num_attention_heads=heads, head_dim=head_dim)
        self.embed = nn.Embedding(vocab, hidden)
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList(_TinyBlock(hidden, heads, head_dim) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.trunk.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_register_architecture_makes_a_custom_model_patchable(backend, monkeypatch, device):
    monkeypatch.setattr(patch_module, "ARCHITECTURES", dict(patch_module.ARCHITECTURES))
    torch.manual_seed(0)
    model = _TinyCustomLM().to(device)
    with pytest.raises(ValueError, match="register_architecture"):
        patch_model(model)
    register_architecture("tiny_custom_lm", layers="trunk.blocks", o_proj="attn_out")

    reference = copy.deepcopy(model)
    heads = [(2, 3), (0, 1), (2, 0)]
    handle = patch_model(model, heads=heads, backend=backend)
    ref_scale, ref_offset = randomize(handle)
    reference_hook_patch(reference, heads, ref_scale, ref_offset,
                         o_projs=[block.attn_out for block in reference.trunk.blocks], num_heads=4)
    ids = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    logits, expected = model(ids), reference(ids)
    torch.testing.assert_close(logits, expected, **LOGITS_TOL)
    mask = torch.ones_like(ids)
    loss_of(logits, mask).backward()
    loss_of(expected, mask).backward()
    assert_grads_close(handle.scale.grad, ref_scale.grad, "grad of scale")
    assert_grads_close(handle.offset.grad, ref_offset.grad, "grad of offset")


# ----------------------------------------------------------------------------------------------
# torch.compile and the lowest layer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_forward_backward_matches_eager(backend, make_tiny_model, device):
    model = make_tiny_model("llama", num_hidden_layers=2)
    handle = patch_model(model, heads=[(1, 4), (0, 1), (1, 0)], backend=backend)
    randomize(handle)
    ids, mask = left_padded_batch(device)

    def step(forward):
        handle.scale.grad = handle.offset.grad = None
        logits = forward(ids, attention_mask=mask).logits
        loss_of(logits, mask).backward()
        return logits.detach(), handle.scale.grad.clone(), handle.offset.grad.clone()

    eager = step(model)
    torch._dynamo.reset()
    try:
        compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    for name, a, b in zip(("logits", "grad of scale", "grad of offset"), eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("heads, reached", [([(2, 1), (2, 4)], [2]), ([(2, 1), (0, 3)], [2, 1, 0])],
                         ids=["layer 2 only", "layers 0 and 2"])
def test_no_gradient_below_the_lowest_patched_layer(heads, reached, mode, backend, make_tiny_model,
                                                    device, monkeypatch):
    model = make_tiny_model("llama")
    called = []
    for index, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda module, grad_in, grad_out, index=index: called.append(index))
    need_grad_z = []
    backward_op = ops._head_affine_backward_op

    def recording_backward_op(*args):
        need_grad_z.append(args[5])
        return backward_op(*args)

    monkeypatch.setattr(ops, "_head_affine_backward_op", recording_backward_op)
    handle = patch_model(model, heads=heads, backend=backend, **MODES[mode])
    randomize(handle)
    ids, mask = left_padded_batch(device)
    loss_of(model(ids, attention_mask=mask).logits, mask).backward()
    assert called == reached
    assert model.model.embed_tokens.weight.grad is None
    if MODES[mode]["scale"]:
        # One backward per patched layer, top first; only the lowest one needs no grad of z.
        layers = sorted({layer for layer, _ in heads}, reverse=True)
        assert need_grad_z == [True] * (len(layers) - 1) + [False]
    else:
        assert need_grad_z == []  # offsets alone are folded into o_proj's output: no op at all


# ----------------------------------------------------------------------------------------------
# LoFiT's parameters stay fp32 when the model is cast; a removed handle says so
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16()],
                         ids=["half", "to-bf16", "bfloat16"])
def test_casting_the_patched_model_keeps_lofit_in_fp32(cast, make_tiny_model, device):
    model = make_tiny_model("llama")
    handle = patch_model(model, heads=HEADS, backend="torch")
    randomize(handle)
    before = [p.detach().clone() for p in (handle.scale, handle.offset)]
    parameters = [handle.scale, handle.offset]
    cast(model)
    for parameter, value, original in zip((handle.scale, handle.offset), before, parameters):
        assert parameter is original and parameter.dtype == torch.float32
        assert torch.equal(parameter, value)  # no round trip through 16 bits
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("lofit.")} != {torch.float32}
    ids, mask = left_padded_batch(device)
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    assert handle.offset.grad.dtype == torch.float32
    model.float()  # and back: the parameters were never rounded
    assert torch.equal(handle.offset, before[1])


@pytest.mark.parametrize("how", ["remove", "merge_and_unload"])
def test_a_removed_handle_says_it_was_removed(how, make_tiny_model):
    handle = patch_model(make_tiny_model("llama"), heads=HEADS)
    getattr(handle, how)()
    assert "removed" in repr(handle)
    for attribute in ("scale", "offset", "enabled"):
        with pytest.raises(RuntimeError, match="removed"):
            getattr(handle, attribute)
    with pytest.raises(RuntimeError, match="removed"):
        handle.enabled = False
    with pytest.raises(RuntimeError, match="removed"):
        with handle.disabled():
            pass
