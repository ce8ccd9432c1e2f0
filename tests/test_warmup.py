"""`lofit_fast.warmup`: a no-op where no kernel compiles, and otherwise one run per shape that leaves the model,
its gradients and the random number generators as they were."""

import pytest
import torch

import lofit_fast
from lofit_fast import tuning


def _patched(make_tiny_model):
    model = make_tiny_model("llama")
    handle = lofit_fast.patch_model(model, heads=[(0, 1), (2, 4)], scale=True, offset=True)
    with torch.no_grad():
        handle.scale.normal_()
        handle.offset.normal_()
    return model, handle


def test_nothing_to_tune_on_the_cpu(make_tiny_model, monkeypatch):
    model, _ = _patched(make_tiny_model)
    if model.device.type == "cuda":
        pytest.skip("on a GPU the model runs compiled kernels: the next test covers warmup there")
    calls = []
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: calls.append(args))
    assert lofit_fast.warmup(model, seq_lens=(1, 16)) == []
    assert calls == [], "warmup ran the model although no kernel compiles on the CPU"


def test_runs_each_shape_and_leaves_the_model_as_it_was(make_tiny_model, monkeypatch):
    """On the CPU the check that the model runs compiled kernels is forced; its LoFiT layers then run as the op
    dispatches them here (Triton's interpreter or torch)."""
    model, handle = _patched(make_tiny_model)
    model.train()
    monkeypatch.setattr(tuning, "runs_compiled_kernels", lambda model: True)
    tokens_seen = []
    transform = lofit_fast.patch.head_affine

    def recording_transform(z, *args, **kwargs):
        tokens_seen.append(z.shape[:-1].numel())
        return transform(z, *args, **kwargs)

    monkeypatch.setattr(lofit_fast.patch, "head_affine", recording_transform)
    state = torch.random.get_rng_state()
    parameters = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    shapes = lofit_fast.warmup(model, seq_lens=(1, 5), batch_sizes=(2, 3))

    assert shapes == [(2, 1), (2, 5), (3, 1), (3, 5)]
    assert tokens_seen == [2, 2, 10, 10, 3, 3, 15, 15], "one call per patched layer (0 and 2) per shape"
    assert handle.scale.grad is None and handle.offset.grad is None
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, parameters[name]), name
