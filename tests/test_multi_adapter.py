"""Many adapters on one base (`load_adapters`): each batch row computes what the model patched with that row's
adapter alone computes, in forward, generate and training; files, errors, removal; the benchmark's smoke run.

Three adapters on a 4-layer tiny llama (6 heads of 12), with random non-zero values:
- "both":  scale + offset on (0, 1), (0, 4), (2, 5), (1, 0)
- "shift": offset only on (0, 4), (2, 5), (3, 1), (3, 2): overlaps "both" in layers 0 and 2; layer 3 has
           only offset adapters, so it takes the fold path, the other layers the routed kernel
- "gain":  scale only on (1, 3), (2, 0): heads no other adapter has

Tolerances (fp32, logits ~0.5): atol 1e-5 [measured <= 2e-7]: the mixed batch runs the same products as the
single-adapter model, except where a layer stacks zeros for heads another adapter holds, or an offset-only
adapter goes through the kernel in the mixed model and through the fold alone (one rounding of z + v).
Gradients: atol 1e-5 [<= 1e-6], token sums in another order.
"""

import copy
import json

import pytest
import torch

import lofit_fast
from lofit_fast.adapter import CONFIG_NAME, load_adapter
from lofit_fast.multi import load_adapters

from helpers import tiny_model

ADAPTERS = {
    "both": ([(0, 1), (0, 4), (2, 5), (1, 0)], True, True),
    "shift": ([(0, 4), (2, 5), (3, 1), (3, 2)], False, True),
    "gain": ([(1, 3), (2, 0)], True, False),
}
NAMES = ["both", "__base__", "shift", "gain", "both"]
LAYERS = 4
ATOL = 1e-5


def base_model():
    return tiny_model("llama", num_hidden_layers=LAYERS)


def save_random_adapter(directory, heads, scale, offset, seed, **model_overrides):
    handle = lofit_fast.patch_model(tiny_model("llama", **{"num_hidden_layers": LAYERS, **model_overrides}), heads,
                                    scale=scale, offset=offset, backend="torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.lofit.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    handle.method_settings = {"step": "tune", "seed": seed}
    handle.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_random_adapter(root / name, heads, scale, offset, seed)
            for seed, (name, (heads, scale, offset)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def batch():
    """5 rows of 8 tokens, rows 1 and 3 left-padded."""
    ids = torch.randint(3, 97, (5, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def single_adapter_model(directories, name, backend="torch", trainable=False):
    """A fresh base with only adapter `name` (the base model itself for "__base__")."""
    model = base_model()
    handle = None if name == "__base__" else load_adapter(model, directories[name], backend=backend,
                                                           trainable=trainable)
    return model, handle


def expected_logits(directories, names, ids, mask):
    """Row b of each single-adapter model run on the whole batch (the same shapes as the mixed run)."""
    rows = {}
    with torch.no_grad():
        for name in set(names):
            rows[name] = single_adapter_model(directories, name)[0](input_ids=ids, attention_mask=mask).logits
    return torch.stack([rows[name][b] for b, name in enumerate(names)])


# ----------------------------------------------------------------------------------------------
# Forward and generate
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_rows_equal_their_single_adapter_models(directories, batch, backend):
    ids, mask = batch
    model = base_model()
    handle = load_adapters(model, directories, backend=backend)
    assert handle.adapter_names == list(ADAPTERS)
    with torch.no_grad():
        mixed = handle(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        # The same route as adapter numbers, through route() and a plain call of the model.
        with handle.route(torch.tensor([0, -1, 1, 2, 0])):
            by_index = model(input_ids=ids, attention_mask=mask).logits
    expected = expected_logits(directories, NAMES, ids, mask)
    torch.testing.assert_close(mixed, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(by_index, mixed, atol=0, rtol=0)
    base_row = base_model()(input_ids=ids, attention_mask=mask).logits[1]
    assert torch.equal(mixed[1], base_row.detach())
    assert (mixed[0] - mixed[1]).abs().max() > 0.01  # the adapters do change the logits


def test_all_offset_only_adapters_fold(tmp_path, batch):
    """Two offset-only adapters sharing a head: every layer takes the fold path (a forward hook)."""
    ids, mask = batch
    directories = {"a": save_random_adapter(tmp_path / "a", [(0, 2), (3, 1)], False, True, seed=7),
                   "b": save_random_adapter(tmp_path / "b", [(3, 1), (1, 5)], False, True, seed=8)}
    model = base_model()
    handle = load_adapters(model, directories, backend="torch")
    assert not any(layer.self_attn.o_proj._forward_pre_hooks for layer in model.model.layers)
    names = ["b", "a", "__base__", "a", "b"]
    with torch.no_grad():
        mixed = handle(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected_logits(directories, names, ids, mask), atol=ATOL, rtol=0)


class OpaqueLinear(torch.nn.Linear):
    """Not exactly nn.Linear, as bitsandbytes' layers: folded_offset goes through the layer's forward."""


def test_folded_offset_of_several_adapters_at_once():
    """One probe call for A offsets gives each adapter's shift, on both of folded_offset's paths."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(72, 48)
    opaque = OpaqueLinear(72, 48)
    opaque.load_state_dict(plain.state_dict())
    head_index, offsets = torch.tensor([4, 1]), torch.randn(3, 2, 12)
    alone = torch.stack([lofit_fast.patch.folded_offset(plain, head_index, v, 12, torch.float32) for v in offsets])
    for o_proj in (plain, opaque):
        together = lofit_fast.patch.folded_offset(o_proj, head_index, offsets, 12, torch.float32)
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def generate(model_or_handle, ids, mask, **kwargs):
    return model_or_handle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                    pad_token_id=0, **kwargs)


@pytest.mark.parametrize("expansion", [{}, dict(num_beams=2, num_return_sequences=2)])
def test_generate_rows_equal_their_single_adapter_models(directories, batch, expansion):
    ids, mask = batch
    names = ["gain", "shift", "__base__", "both"]
    ids, mask = ids[1:], mask[1:]  # a left-padded row included
    handle = load_adapters(base_model(), directories, backend="torch")
    mixed = generate(handle, ids, mask, adapter_names=names, **expansion)
    copies = expansion.get("num_return_sequences", 1)
    assert mixed.shape[0] == len(names) * copies
    for name in set(names):
        alone = generate(single_adapter_model(directories, name)[0], ids, mask, **expansion)
        for b in [b for b, row_name in enumerate(names) if row_name == name]:
            rows = slice(b * copies, (b + 1) * copies)  # generate repeats each input row (repeat_interleave)
            assert torch.equal(mixed[rows], alone[rows]), (name, mixed[rows], alone[rows])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def weighted_logit_sum(model, ids, weights):
    """A loss that is a sum over rows, so the mixed batch's gradient is the sum of each row's."""
    return (model(input_ids=ids).logits * weights).sum()


def test_mixed_batch_gradients_equal_single_adapter_runs(directories, batch):
    ids = batch[0][:, 3:]  # no padding
    names = ["both", "shift", "both", "__base__", "shift"]  # "gain" gets no row
    weights = torch.randn(*ids.shape, 97, generator=torch.Generator().manual_seed(3))
    model = base_model()
    handle = load_adapters(model, directories, backend="torch", trainable=True)
    with handle.route(names):
        weighted_logit_sum(model, ids, weights).backward()
    for name in ADAPTERS:
        rows = [b for b, row_name in enumerate(names) if row_name == name]
        mixed = handle.parameters_of(name)
        if not rows:
            assert all(p.grad is None or not p.grad.any() for p in mixed.parameters())
            continue
        alone_model, alone = single_adapter_model(directories, name, trainable=True)
        weighted_logit_sum(alone_model, ids[rows], weights[rows]).backward()
        for kind in ("scale", "offset"):
            if getattr(alone, kind) is not None:
                torch.testing.assert_close(getattr(mixed, kind).grad, getattr(alone, kind).grad, atol=ATOL, rtol=1e-4)


def test_gradient_checkpointing_inside_the_route(directories, batch):
    """Checkpointing runs each layer's forward again during backward: under the same route, the same grads."""
    ids = batch[0][:, 3:]
    names = ["both", "shift", "gain", "__base__", "both"]
    grads = []
    for checkpointing in (False, True):
        model = base_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        handle = load_adapters(model, directories, backend="torch", trainable=True)
        with handle.route(names):
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.lofit_adapters.parameters()])
    loss = handle(input_ids=ids, labels=ids, adapter_names=names).loss
    with pytest.raises(RuntimeError, match="call backward inside the route"):
        loss.backward()  # the route ended with the call; the recomputed forward has none
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=ATOL, rtol=1e-4)


def test_optimizer_steps_change_only_lofit_parameters(directories, batch):
    ids = batch[0][:, 3:]
    model = base_model()
    base_state = {name: t.clone() for name, t in model.state_dict().items()}
    handle = load_adapters(model, directories, backend="torch", trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("lofit_adapters.") for name in trainable)
    before = {name: p.detach().clone() for name, p in model.lofit_adapters.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    names = ["both", "shift", "gain", "__base__", "both"]
    for _ in range(3):
        optimizer.zero_grad()
        loss = handle(input_ids=ids, labels=ids, adapter_names=names).loss
        loss.backward()
        optimizer.step()
    state = model.state_dict()
    for name, tensor in base_state.items():
        assert torch.equal(state[name], tensor), name
    for name, parameter in model.lofit_adapters.named_parameters():
        assert not torch.equal(parameter, before[name]), name


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def test_save_pretrained_round_trips_through_load_adapter(directories, batch, tmp_path):
    handle = load_adapters(base_model(), directories, backend="torch")
    with torch.no_grad():
        handle.parameters_of("both").offset.add_(0.25)  # saved as it is now, not as it was loaded
    handle.save_pretrained(tmp_path / "saved", "both")
    model = base_model()
    loaded = load_adapter(model, tmp_path / "saved", backend="torch")
    assert loaded.heads == ADAPTERS["both"][0] == handle.heads_of("both")
    for kind in ("scale", "offset"):
        assert torch.equal(getattr(loaded, kind), getattr(handle.parameters_of("both"), kind))
    assert loaded.method_settings == {"step": "tune", "seed": 0}
    ids, mask = batch
    with torch.no_grad():
        mixed = handle(input_ids=ids, attention_mask=mask, adapter_names=["both"] * 5).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, mixed, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def test_routing_errors(directories, batch):
    ids, mask = batch
    model = base_model()
    handle = load_adapters(model, directories, backend="torch")
    with pytest.raises(ValueError, match="unknown adapter name\\(s\\) \\['nope'\\]"):
        handle(input_ids=ids, adapter_names=["both", "nope", "gain", "gain", "gain"])
    with pytest.raises(ValueError, match="the batch has 5 rows but adapter_names has 4"):
        handle(input_ids=ids, adapter_names=["both"] * 4)
    with pytest.raises(ValueError, match="reaching o_proj has 5 rows, but the route has 3"):
        with handle.route(["both"] * 3):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="-1 \\(base model\\) or 0..2"):
        handle.route(torch.tensor([0, 3])).__enter__()
    with pytest.raises(TypeError, match="one name per batch row"):
        handle.route("both").__enter__()
    with pytest.raises(RuntimeError, match="no adapter route is set"):
        model(input_ids=ids)
    assert model.lofit_adapters.adapter_index is None  # a failed call leaves no route behind


def test_loading_errors_leave_the_model_untouched(directories, tmp_path):
    model = base_model()
    other_shape = save_random_adapter(tmp_path / "other", [(0, 1)], True, True, seed=9, num_hidden_layers=2)
    with pytest.raises(ValueError, match="saved for 2 layers x 6 heads"):
        load_adapters(model, {"both": directories["both"], "other": other_shape})
    for name in ("__base__", "", "a.b", "keys", "head_index_0"):
        with pytest.raises(ValueError, match="reserved|non-empty|not allowed"):
            load_adapters(model, {name: directories["both"]})
    moved = tmp_path / "moved"
    save_random_adapter(moved, [(0, 1)], True, True, seed=9)
    config = json.loads((moved / CONFIG_NAME).read_text())
    (moved / CONFIG_NAME).write_text(json.dumps({**config, "target_module": "self_attn.o_proj"}))
    with pytest.raises(ValueError, match="must share target_module"):
        load_adapters(model, {"both": directories["both"], "moved": moved})
    assert not hasattr(model, "lofit_adapters") and all(p.requires_grad for p in model.parameters())
    lofit_fast.patch_model(model, [(0, 1)])
    with pytest.raises(ValueError, match="already carries a LoFiT adapter"):
        load_adapters(model, directories)
    model = base_model()
    load_adapters(model, directories)
    with pytest.raises(ValueError, match="already carries adapters from load_adapters"):
        load_adapters(model, directories)


# ----------------------------------------------------------------------------------------------
# Removal and copies
# ----------------------------------------------------------------------------------------------

def test_remove_restores_the_model(directories, batch):
    ids, mask = batch
    model = base_model()
    model.lm_head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    handle = load_adapters(model, directories, backend="torch")
    assert not any(p.requires_grad for p in model.parameters())
    assert handle.remove() is model
    assert not hasattr(model, "lofit_adapters")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj._forward_pre_hooks and not layer.self_attn.o_proj._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    with pytest.raises(RuntimeError, match="removed"):
        handle.remove()


def test_deepcopy_of_a_routed_model_uses_its_own_parameters_and_route(directories, batch):
    ids, mask = batch
    model = base_model()
    handle = load_adapters(model, directories, backend="torch")
    with handle.route(NAMES), torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
        copied.lofit_adapters["both"].offset.zero_()  # the original's parameters do not change
        with handle.route(NAMES):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Routes across inference mode, batches that do not match the route, names, casts
# ----------------------------------------------------------------------------------------------

def test_a_route_can_train_after_an_inference_mode_pass(directories, batch):
    """The expanded route index is cached per batch; one made under inference_mode must not reach training."""
    ids = batch[0][:, 3:]
    names = ["both", "shift", "gain", "__base__", "both"]
    model = base_model()
    handle = load_adapters(model, directories, backend="torch", trainable=True)
    with handle.route(names):
        with torch.inference_mode():
            evaluated = model(input_ids=ids).logits
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert all(p.grad is not None for p in handle.parameters_of("both").parameters())
    torch.testing.assert_close(evaluated, handle(input_ids=ids, adapter_names=names).logits.detach(), atol=0, rtol=0)


def test_a_batch_of_several_copies_of_the_route_is_refused_outside_generate(directories, batch):
    """TRL's DPO concatenates [chosen; rejected]: a route of one name per pair would be expanded [a, a, b, b]
    where the rows are [a, b, a, b]. Only generate repeats rows in a known way; elsewhere one name per row."""
    ids = batch[0][:2]
    model = base_model()
    handle = load_adapters(model, directories, backend="torch")
    with pytest.raises(ValueError, match="4 rows, but the route has 2.*one adapter name per row"):
        with handle.route(["both", "gain"]):
            model(input_ids=torch.cat([ids, ids]))
    with handle.route(["both", "gain", "both", "gain"]), torch.no_grad():  # [chosen; rejected], named row by row
        concatenated = model(input_ids=torch.cat([ids, ids])).logits
    with torch.no_grad():
        expected = handle(input_ids=ids, adapter_names=["both", "gain"]).logits
    torch.testing.assert_close(concatenated, torch.cat([expected, expected]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["set_route", "index_for", "routes_layer", "layer_parameters", "layer_routing"])
def test_adapter_names_that_are_bank_attributes_are_refused(directories, name):
    model = base_model()
    with pytest.raises(ValueError, match=f"adapter name '{name}' is not allowed"):
        load_adapters(model, {name: directories["both"]})
    assert not hasattr(model, "lofit_adapters")


def test_casting_the_model_keeps_the_adapters_in_fp32(directories):
    model = base_model()
    handle = load_adapters(model, directories, backend="torch")
    before = {name: p.detach().clone() for name, p in model.lofit_adapters.named_parameters()}
    model.to(torch.bfloat16)
    for name, parameter in model.lofit_adapters.named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, before[name]), name
    assert handle.parameters_of("shift").offset.dtype == torch.float32
