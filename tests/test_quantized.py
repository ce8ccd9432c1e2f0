"""LoFiT on bitsandbytes bases: 8-bit (LLM.int8) and 4-bit (NF4, FP4, double quant; bf16 / fp16 / fp32
compute), loaded as a user loads them: a tiny llama saved to a directory and read back with
`from_pretrained(..., quantization_config=...)`. Every check compares lofit_fast with
tests/helpers.reference_hook_patch on the *same* quantized base. The backend is "torch" throughout: the
quantized layers are what is under test here (the kernels have their own tests).

Tolerances (logits of magnitude ~0.5; measured values on the CPU in brackets):
- Scales (with or without offsets): the pre-hook computes the same z' as the reference, and usually the
  same logits [0], but a matmul's last bit can depend on how its input happens to be aligned in memory
  [6e-8 once, in fp32 generation]: fp32 atol 1e-5; bf16 / fp16 two units of the dtype's eps, 1.6e-2 /
  2e-3. The gradients are fp32 sums over tokens in another order: relative 1e-5 [7e-8].
- Offsets only: patch_model folds them into o_proj's output, o_proj(z) + (o_proj(v_hat) - o_proj(0)),
  where the reference computes o_proj(z + v_hat). bitsandbytes' 4-bit layers dequantize and multiply
  (so does LLM.int8 in training mode on the CPU), so the two are the same products rounded in another
  order: the same bounds [fp32 1.8e-7, bf16 2.9e-3, fp16 4.9e-4]; gradients of the offsets, relative
  (norm) error, the same bounds [2.6e-7, 4.8e-3, 4.9e-4].
- Offsets only on LLM.int8 where it quantizes its input row by row (inference; training too on a GPU):
  the fold gives W Q(z) + W Q(v_hat), the reference W Q(z + v_hat), one input quantization step apart,
  the size of the int8-vs-fp32 difference of the base itself: atol 2e-2 [5.4e-3 to 5.9e-3], gradients
  relative 2e-2 [6.9e-3], as in test_adapter's 8-bit merge at inference.
"""

import logging
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lofit_fast
from lofit_fast.adapter import load_adapter
from lofit_fast.quantization import (
    QuantizationInfo,
    enable_gradient_checkpointing,
    prepare_kbit_training,
    quantization_info,
)
from lofit_fast.training import StepSettings, select_heads, tune

from bnb_cpu import CPU_KINDS, cpu_kind, is_repacked
from helpers import QUANTIZABLE_CONFIG, assert_same_greedy_run, reference_hook_patch, tiny_model

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8's "inputs will be cast to fp16"

# name -> (BitsAndBytesConfig arguments, dtype of the non-quantized weights). Covers 8-bit and both 4-bit
# types, double quant on and off, and each compute dtype.
QUANTIZATIONS = {
    "int8-fp32": (dict(load_in_8bit=True), torch.float32),
    "int8-fp16": (dict(load_in_8bit=True), torch.float16),
    "nf4-fp32": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                 torch.float32),
    "nf4-bf16-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                         bnb_4bit_use_double_quant=True), torch.bfloat16),
    "fp4-fp16": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16),
                 torch.float16),
    "fp4-bf16-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16,
                         bnb_4bit_use_double_quant=True), torch.bfloat16),
}
# Only for the upcast measurement: NF4 with bf16 compute, non-quantized weights in bf16 or in fp32.
_NF4_BF16 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
UPCAST_QUANTIZATIONS = {"nf4-bf16": (_NF4_BF16, torch.bfloat16),
                        "nf4-bf16-compute-fp32-weights": (_NF4_BF16, torch.float32)}
MODES = {"scale+offset": dict(scale=True, offset=True), "offset": dict(scale=False, offset=True)}
HEADS = [(2, 5), (1, 0), (2, 0), (1, 4), (2, 3)]  # lowest selected layer: 1 of 0..2
HEAD_DIM = QUANTIZABLE_CONFIG["head_dim"]
IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))



def load_quantized(directory, name, device):
    arguments, dtype = {**QUANTIZATIONS, **UPCAST_QUANTIZATIONS}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(**arguments),
                                                    dtype=dtype, device_map={"": str(device)})


def random_parameters(count, mode, seed=1, magnitude=0.5):
    """(scale or None, offset) leaf tensors, (count, HEAD_DIM) fp32, requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    scale, offset = (torch.randn(count, HEAD_DIM, generator=generator) * magnitude for _ in range(2))
    return (scale.requires_grad_() if MODES[mode]["scale"] else None), offset.requires_grad_()


def patched(model, mode, heads=HEADS, seed=1):
    """`model` patched (trainable) on `heads` with `random_parameters(len(heads), mode, seed)`."""
    handle = lofit_fast.patch_model(model, heads, backend="torch", **MODES[mode])
    scale, offset = random_parameters(len(heads), mode, seed)
    with torch.no_grad():
        for parameter, value in ((handle.scale, scale), (handle.offset, offset)):
            if parameter is not None:
                parameter.copy_(value)
    return handle


def tolerance(name, mode, training, device):
    """atol on logits (and relative tolerance on gradients) for patched vs reference; see the module doc."""
    if not MODES[mode]["scale"] and name.startswith("int8") and not (training and device.type == "cpu"):
        return 2e-2
    dtype = QUANTIZATIONS[name][1]
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def quantized_weights(model):
    return [module.weight.data.clone() for module in model.modules() if isinstance(module, (bnb.nn.Linear4bit,
                                                                                              bnb.nn.Linear8bitLt))]


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(QUANTIZATIONS))
def test_quantization_info(quantizable_base, name, device):
    arguments, dtype = QUANTIZATIONS[name]
    info = quantization_info(load_quantized(quantizable_base, name, device))
    # 3 layers x (q, k, v, o, gate, up, down); lm_head stays unquantized.
    assert info == QuantizationInfo(method=arguments.get("bnb_4bit_quant_type", "int8"),
                                    double_quant=arguments.get("bnb_4bit_use_double_quant", False),
                                    compute_dtype=arguments.get("bnb_4bit_compute_dtype"), num_layers=21)
    assert info.bits == (8 if name.startswith("int8") else 4)


def test_plain_model_is_not_quantized():
    assert quantization_info(tiny_model("llama")) is None


# ----------------------------------------------------------------------------------------------
# Same function as the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(QUANTIZATIONS))
def test_logits_and_gradients_match_reference(quantizable_base, name, mode, training, device):
    model = prepare_kbit_training(load_quantized(quantizable_base, name, device).train(training))
    ids = IDS.to(device)
    scale, offset = (p.to(device).detach().requires_grad_() if p is not None else None
                     for p in random_parameters(len(HEADS), mode))
    remove = reference_hook_patch(model, HEADS, scale, offset)
    expected = model(ids).logits.float()
    expected.square().mean().backward()
    remove()
    with torch.no_grad():
        base = model(ids).logits.float()
    handle = patched(model, mode)
    actual = model(ids).logits.float()
    actual.square().mean().backward()

    atol = tolerance(name, mode, training, device)
    assert (expected - base).abs().max() > 0.3  # the adapter changes the output far beyond the tolerance
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    for parameter, reference in ((handle.scale, scale), (handle.offset, offset)):
        if reference is not None:
            assert relative_error(parameter.grad, reference.grad) <= max(atol, 1e-5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("lofit."))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["int8-fp32", "nf4-bf16-dq", "fp4-fp16"])
def test_greedy_generate_with_kv_cache_matches_reference(quantizable_base, name, mode, device):
    model = load_quantized(quantizable_base, name, device).eval()
    prompt = IDS[:, :5].to(device)

    def generate():
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                 use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits).float()

    # Patched first: the adapter is trainable, so the 4-bit layers it trains through stay off bitsandbytes' CPU
    # inference kernel (where the CPU has it) for every run below, the base and the reference included.
    handle = patched(model, mode)
    with handle.disabled():
        base_tokens, _ = generate()
        scale, offset = (p.detach().to(device) if p is not None else None
                         for p in random_parameters(len(HEADS), mode))
        remove = reference_hook_patch(model, HEADS, scale, offset)
        expected_tokens, expected_logits = generate()
        remove()
    tokens, logits = generate()
    assert not torch.equal(expected_tokens, base_tokens)  # the adapter changes what is generated
    assert_same_greedy_run(tokens, logits, expected_tokens, expected_logits, atol=tolerance(name, mode, False, device))


# ----------------------------------------------------------------------------------------------
# Training (steps 1 and 2 through Trainer) and adapter files
# ----------------------------------------------------------------------------------------------

def sft_rows(count=8, length=9):
    ids = torch.randint(3, 97, (count, length), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


QUIET = {"disable_tqdm": True, "logging_steps": 1000, "max_steps": 2}


@pytest.mark.parametrize("name", ["int8-fp32", "nf4-bf16-dq", "fp4-bf16-dq", "fp4-fp16"])
def test_select_heads_and_tune_on_a_quantized_base(quantizable_base, name, device, tmp_path):
    quiet = QUIET
    if name.endswith("fp16"):  # float16 compute trains with loss scaling only, which Trainer has on GPUs
        if device.type == "cpu":
            pytest.skip("fp16 loss scaling needs a GPU (test_float16_compute_without_loss_scaling_is_refused)")
        quiet = {**QUIET, "fp16": True}
    model = load_quantized(quantizable_base, name, device)
    weights = quantized_weights(model)
    learning_rate = 1e-2
    settings = StepSettings(learning_rate=learning_rate, l1_lambda=1e-3, per_device_train_batch_size=4)
    ranking = select_heads(model, sft_rows(), collate, settings=settings, output_dir=str(tmp_path / "select"),
                           training_args=quiet, backend="torch")
    every_head = [(layer, head) for layer in range(3) for head in range(6)]
    assert sorted((layer, head) for layer, head, _ in ranking.ranking) == every_head
    scores = [score for _, _, score in ranking.ranking]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert not hasattr(model, "lofit")

    settings = StepSettings(learning_rate=learning_rate, per_device_train_batch_size=4, init_std=1e-3)
    handle = tune(model, sft_rows(), collate, ranking=ranking, k=4, settings=settings,
                  output_dir=str(tmp_path / "tune"), training_args={**quiet, "max_steps": 1}, backend="torch")
    assert handle.heads == ranking.top(4) and handle.scale is None and handle.offset.dtype == torch.float32
    generator = torch.Generator().manual_seed(settings.seed)
    initial = torch.randn(handle.offset.shape, generator=generator) * settings.init_std
    # Adam's first step moves every entry by lr * g / (|g| + 1e-8): by lr, wherever the gradient reached.
    moved = (handle.offset.detach().cpu() - initial.cpu()).abs()
    # (Short of lr by lr * 1e-8 / |g|: 1e-2 allows |g| down to 1e-6, which a bf16 entry can get.)
    torch.testing.assert_close(moved, torch.full_like(moved, learning_rate), rtol=1e-2, atol=0)
    assert [key for key, p in model.named_parameters() if p.requires_grad] == ["lofit.offset"]
    assert all(torch.equal(a, b) for a, b in zip(quantized_weights(model), weights))  # base untouched


@pytest.mark.parametrize("name", ["int8-fp16", "fp4-fp16"])
def test_float16_compute_without_loss_scaling_is_refused(quantizable_base, name, device, tmp_path):
    """Pure float16 training loses gradients below its range; Trainer's loss scaling (fp16=True) exists on GPUs."""
    model = load_quantized(quantizable_base, name, device)
    with pytest.raises(ValueError, match="float16.*no loss scaling"):
        tune(model, sft_rows(), collate, heads=[(2, 1)], settings=StepSettings(per_device_train_batch_size=4),
             output_dir=str(tmp_path), training_args=QUIET, backend="torch")
    assert not hasattr(model, "lofit")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["int8-fp32", "nf4-bf16-dq", "fp4-fp16"])
def test_adapter_round_trip_on_a_quantized_base(quantizable_base, name, mode, device, tmp_path):
    model = load_quantized(quantizable_base, name, device).eval()
    handle = patched(model, mode)
    with torch.no_grad():
        expected = model(IDS.to(device)).logits
    handle.save_pretrained(tmp_path)
    fresh = load_quantized(quantizable_base, name, device).eval()
    loaded = load_adapter(fresh, tmp_path, backend="torch")
    for key, parameter in handle.lofit.named_parameters():
        assert torch.equal(getattr(loaded.lofit, key), parameter)
    with torch.no_grad():
        assert torch.equal(fresh(IDS.to(device)).logits, expected)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing: same gradients, and backward still stops at the lowest selected layer
# ----------------------------------------------------------------------------------------------

def record_backward(model):
    """Lists filled during backward: layers whose o_proj is recomputed (checkpointing), and layers
    that backward reaches (a full backward hook fires)."""
    recomputed, reached, state = [], [], {"backward": False}
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda module, args, index=index: recomputed.append(index) if state["backward"] else None)
        layer.register_full_backward_hook(lambda module, grad_in, grad_out, index=index: reached.append(index))
    return recomputed, reached, state


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["int8-fp32", "nf4-fp32", "nf4-bf16-dq"])
def test_gradient_checkpointing_gives_the_same_gradients_and_stops_at_the_lowest_layer(quantizable_base, name, mode,
                                                                                       device):
    results = {}
    for checkpointing in (False, True):
        model = prepare_kbit_training(load_quantized(quantizable_base, name, device).train(),
                                      gradient_checkpointing=checkpointing)
        handle = patched(model, mode)
        recomputed, reached, state = record_backward(model)
        loss = model(IDS.to(device), labels=IDS.to(device)).loss
        state["backward"] = True
        loss.backward()
        results[checkpointing] = [p.grad for p in handle.lofit.parameters()], recomputed, reached
        assert model.model.embed_tokens.weight.grad is None
    (plain_grads, plain_recomputed, plain_reached), (grads, recomputed, reached) = results[False], results[True]
    assert plain_recomputed == [] and plain_reached == [2, 1]
    assert recomputed == [2, 1] and reached == [2, 1]  # layer 0 is neither recomputed nor reached
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:`gradient_checkpointing")
def test_trainer_gradient_checkpointing_stops_at_the_lowest_layer(quantizable_base, device, tmp_path):
    """Trainer's own checkpointing would make the embeddings' output require grad (every layer then runs
    backward); training.py takes it over."""
    model = load_quantized(quantizable_base, "nf4-bf16-dq", device)
    recomputed, reached, state = record_backward(model)
    model.register_forward_pre_hook(lambda module, args: state.update(backward=False))
    model.register_forward_hook(lambda module, args, output: state.update(backward=True))
    tune(model, sft_rows(), collate, heads=[(2, 1), (1, 3)], settings=StepSettings(per_device_train_batch_size=4),
         output_dir=str(tmp_path), backend="torch",
         training_args={**QUIET, "gradient_checkpointing": True,
                        "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert recomputed == [2, 1, 2, 1] and reached == [2, 1, 2, 1]  # two steps, layer 0 never


def test_reentrant_checkpointing_is_refused(quantizable_base, device):
    model = load_quantized(quantizable_base, "nf4-fp32", device)
    with pytest.raises(ValueError, match="non-reentrant"):
        enable_gradient_checkpointing(model, {"use_reentrant": True})


# ----------------------------------------------------------------------------------------------
# Memory: what is saved for backward
# ----------------------------------------------------------------------------------------------

def saved_for_backward(model, ids):
    """Bytes of the tensors autograd saves for backward during one forward (storages counted once,
    the model's own parameters and buffers not at all), by the decoder layer running when they were
    saved (-1: before the first layer)."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages, current = {}, {"layer": -1}
    hooks = [layer.register_forward_pre_hook(lambda module, args, index=index: current.update(layer=index))
             for index, layer in enumerate(model.model.layers)]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = (current["layer"], storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, labels=ids)
    for hook in hooks:
        hook.remove()
    by_layer = {}
    for layer, nbytes in storages.values():
        by_layer[layer] = by_layer.get(layer, 0) + nbytes
    return by_layer


def frozen_floor_hook(model, lowest, mode):
    """The least any adapter at the lowest selected o_proj costs: the frozen model with that o_proj's
    output (offsets) or input (scales, which need dL/dz) made to require grad."""
    o_proj = model.model.layers[lowest].self_attn.o_proj
    if MODES[mode]["scale"]:
        return o_proj.register_forward_pre_hook(lambda module, args: (args[0].detach().requires_grad_(), *args[1:]))
    return o_proj.register_forward_hook(lambda module, args, output: output.detach().requires_grad_())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["int8-fp32", "nf4-fp32", "nf4-bf16-dq"])
def test_saved_for_backward_is_the_frozen_floor_plus_the_selected_heads(quantizable_base, name, mode, device):
    model = prepare_kbit_training(load_quantized(quantizable_base, name, device).train())
    element_size = QUANTIZATIONS[name][1].itemsize
    for batch, length in ((2, 9), (3, 16)):
        ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
        hook = frozen_floor_hook(model, lowest=1, mode=mode)
        floor = saved_for_backward(model, ids)
        hook.remove()
        handle = patched(model, mode)
        lofit = saved_for_backward(model, ids)
        handle.remove()
        selected = len(HEADS) * HEAD_DIM
        if MODES[mode]["scale"]:
            # The selected heads' slice of z for dL/dA, and each layer's gathered rows of A (fp32).
            expected = batch * length * selected * element_size + selected * 4
        else:
            # Nothing per token: only the two int64 index vectors of the index_put that builds the
            # o_proj(v_hat) probe, one entry per selected column.
            expected = 2 * selected * 8
        assert sum(lofit.values()) - sum(floor.values()) == expected
        assert all(lofit.get(layer, 0) == floor.get(layer, 0) == 0 for layer in (-1, 0))  # below the lowest
        assert lofit[2] - floor[2] > 0 and lofit[1] - floor[1] > 0


# ----------------------------------------------------------------------------------------------
# Why prepare_kbit_training does not upcast (PEFT's prepare_model_for_kbit_training does)
# ----------------------------------------------------------------------------------------------

def upcast_like_peft(model):
    for parameter in model.parameters():
        if parameter.dtype in (torch.float16, torch.bfloat16) and type(parameter).__name__ != "Params4bit":
            parameter.data = parameter.data.float()
    return model


@pytest.mark.parametrize("mode", list(MODES))
def test_fp32_upcast_buys_no_accuracy_and_costs_memory(quantizable_base, mode, device):
    """NF4 with bf16 compute, the LoFiT gradients against the same NF4 base computed in fp32: upcasting
    the norms and embeddings to fp32 removes under 10% of the bf16 error [6% / 0.3%], and every
    activation saved for backward becomes fp32: exactly what an fp32 model saves [+52% / +48%]."""
    ids = IDS.to(device)

    def gradient_and_saved(name, upcast):
        model = load_quantized(quantizable_base, name, device).train()
        model = upcast_like_peft(model) if upcast else model
        handle = patched(model, mode)
        with torch.no_grad():
            for parameter in handle.lofit.parameters():
                parameter.mul_(0.01)
        model(ids, labels=ids).loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in handle.lofit.parameters()])
        handle.remove()
        patched(model, mode)
        return gradient, sum(saved_for_backward(model, ids).values())

    truth, _ = gradient_and_saved("nf4-fp32", upcast=False)
    kept, kept_bytes = gradient_and_saved("nf4-bf16", upcast=False)
    upcast, upcast_bytes = gradient_and_saved("nf4-bf16", upcast=True)
    _, fp32_bytes = gradient_and_saved("nf4-bf16-compute-fp32-weights", upcast=False)
    assert relative_error(upcast, truth) > 0.9 * relative_error(kept, truth)
    assert upcast_bytes == fp32_bytes > 1.4 * kept_bytes


# ----------------------------------------------------------------------------------------------
# bitsandbytes' CPU inference kernel for 4-bit weights has no backward
# ----------------------------------------------------------------------------------------------

def cpu_linear4bit():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    return torch.nn.Sequential(layer.to("cpu"))


def test_4bit_cpu_repacking_is_switched_off():
    model = cpu_linear4bit()
    model[0].support_avx512bf16_for_cpu = True
    prepare_kbit_training(model)
    assert model[0].support_avx512bf16_for_cpu is False
    with torch.no_grad():
        model.eval()(torch.randn(2, 128))  # where bitsandbytes would repack
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)


def test_a_repacked_4bit_weight_is_refused():
    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking of 4-bit weights")
    model = cpu_linear4bit()
    weight = model[0].weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with pytest.raises(ValueError, match="repacked the 4-bit weights of 0 .* Load the model again"):
        prepare_kbit_training(model)


# ----------------------------------------------------------------------------------------------
# Every kind of CPU: with and without bitsandbytes' repacking for its AVX512-BF16 kernel (tests/bnb_cpu.py:
# the real kernel where this CPU has it, a plain-torch stand-in where it does not)
# ----------------------------------------------------------------------------------------------

REPACKING_NAMES = ["nf4-fp32", "nf4-bf16-dq", "fp4-fp16"]


@pytest.fixture(params=CPU_KINDS)
def cpu(request, device):
    """Quantized layers loaded inside the test behave as on a CPU of this kind."""
    if device.type != "cpu":
        pytest.skip("bitsandbytes repacks 4-bit weights for its CPU kernel only")
    with cpu_kind(request.param):
        yield request.param


def linear4bit_modules(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def reference_run(quantizable_base, name, device, mode, heads, train_mode=False):
    """Logits and LoFiT gradients of the per-head reference on a model whose 4-bit layers never repack."""
    with cpu_kind("plain"):
        model = load_quantized(quantizable_base, name, device).train(train_mode)
        scale, offset = (p.to(device).detach().requires_grad_() if p is not None else None
                         for p in random_parameters(len(heads), mode))
        remove = reference_hook_patch(model, heads, scale, offset)
        logits = model(IDS.to(device)).logits.float()
        logits.square().mean().backward()
        remove()
    return logits.detach(), [p.grad for p in (scale, offset) if p is not None]


def assert_matches_reference(handle, logits, expected_logits, expected_grads, name, mode):
    grads = [p.grad for p in (handle.scale, handle.offset) if p is not None]
    assert all(grad is not None for grad in grads), "a LoFiT parameter got no gradient"
    atol = tolerance(name, mode, False, torch.device("cpu"))
    torch.testing.assert_close(logits, expected_logits, atol=atol, rtol=0)
    for grad, expected in zip(grads, expected_grads):
        assert relative_error(grad, expected) <= max(atol, 1e-5)


@pytest.mark.parametrize("name", REPACKING_NAMES)
def test_offsets_on_the_last_layer_train_in_eval_mode(quantizable_base, name, cpu, device):
    """The case that lost its gradient: offsets only (folded into o_proj's output), the last layer, eval mode,
    no prepare_kbit_training. o_proj's own input needs no grad there, so bitsandbytes would repack o_proj on
    the spot, and the fold would then run through a kernel without backward."""
    heads = [(2, 1), (2, 4)]
    expected_logits, expected_grads = reference_run(quantizable_base, name, device, "offset", heads)
    model = load_quantized(quantizable_base, name, device).eval()
    handle = patched(model, "offset", heads=heads)
    logits = model(IDS.to(device)).logits.float()
    logits.square().mean().backward()
    assert_matches_reference(handle, logits, expected_logits, expected_grads, name, "offset")
    assert not any(is_repacked(layer) for layer in linear4bit_modules(model).values())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", REPACKING_NAMES)
def test_an_inference_call_between_training_steps_changes_nothing(quantizable_base, name, mode, cpu, device):
    """Generation or evaluation (eval mode, no grad) after patching, then training again: same gradients."""
    expected_logits, expected_grads = reference_run(quantizable_base, name, device, mode, HEADS, train_mode=True)
    model = load_quantized(quantizable_base, name, device)
    handle = patched(model, mode)
    prompt = IDS[:, :4].to(device)
    with torch.no_grad():
        model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)
    logits = model.train()(IDS.to(device)).logits.float()
    logits.square().mean().backward()
    assert_matches_reference(handle, logits, expected_logits, expected_grads, name, mode)


def attach_trainable(entry, model, adapter_dir):
    if entry == "patch_model":
        return lofit_fast.patch_model(model, HEADS, backend="torch")
    if entry == "load_adapter":
        return load_adapter(model, adapter_dir, backend="torch", trainable=True)
    if entry == "get_lofit_model":
        return lofit_fast.get_lofit_model(model, lofit_fast.LofitConfig(heads=HEADS, backend="torch"))
    if entry == "LofitModel.from_pretrained":
        return lofit_fast.LofitModel.from_pretrained(model, adapter_dir, is_trainable=True, backend="torch")
    return lofit_fast.load_adapters(model, {"only": adapter_dir}, backend="torch", trainable=True)


ENTRIES = ["patch_model", "load_adapter", "get_lofit_model", "LofitModel.from_pretrained", "load_adapters"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_trainable_adapter_after_an_inference_call(quantizable_base, entry, cpu, device, tmp_path):
    """An inference call before the adapter is attached: on an AVX512-BF16 CPU bitsandbytes has repacked the
    weights, which cannot be undone exactly, so a trainable adapter is refused with the remedy and nothing
    changes; on other CPUs it trains."""
    patched(load_quantized(quantizable_base, "nf4-bf16-dq", device), "scale+offset").save_pretrained(tmp_path)
    model = load_quantized(quantizable_base, "nf4-bf16-dq", device).eval()
    with torch.no_grad():
        base = model(IDS.to(device)).logits
    requires_grad = {key: p.requires_grad for key, p in model.named_parameters()}
    repacking = {key: layer.support_avx512bf16_for_cpu for key, layer in linear4bit_modules(model).items()}
    if cpu == "avx512bf16":
        # Backward needs layer 1's o_proj and MLP (its q, k, v run before o_proj) and all 7 of layer 2.
        with pytest.raises(ValueError, match=r"repacked the 4-bit weights of model\.layers\.1\.self_attn\.o_proj, "
                                             r".* and 7 more.*no backward.*trainable=False"):
            attach_trainable(entry, model, tmp_path)
        assert not hasattr(model, "lofit") and not hasattr(model, "lofit_adapters")
        assert {key: p.requires_grad for key, p in model.named_parameters()} == requires_grad
        assert {key: layer.support_avx512bf16_for_cpu for key, layer in linear4bit_modules(model).items()} == repacking
        with torch.no_grad():
            assert torch.equal(model(IDS.to(device)).logits, base)
    else:
        attached = attach_trainable(entry, model, tmp_path)
        if entry == "load_adapters":
            with attached.route(["only", "only"]):
                model(IDS.to(device)).logits.float().square().mean().backward()
            parameters = attached.parameters_of("only").parameters()
        else:
            model(IDS.to(device)).logits.float().square().mean().backward()
            parameters = model.lofit.parameters()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)


@pytest.mark.parametrize("mode", list(MODES))
def test_an_adapter_for_inference_keeps_the_fast_kernel_and_refuses_to_train_through_it(quantizable_base, mode, cpu,
                                                                                       device, tmp_path):
    """load_adapter(trainable=False) on a model that has run inference: it computes the reference's function on
    the same base (repacked or not), and if its parameters are made trainable, a forward that needs their
    gradient through a repacked layer raises instead of losing it."""
    patched(load_quantized(quantizable_base, "nf4-bf16-dq", device), mode).save_pretrained(tmp_path)
    model = load_quantized(quantizable_base, "nf4-bf16-dq", device).eval()
    with torch.no_grad():
        model(IDS.to(device))
    repacked = cpu == "avx512bf16"
    assert all(is_repacked(layer) == repacked for layer in linear4bit_modules(model).values())
    scale, offset = random_parameters(len(HEADS), mode)
    remove = reference_hook_patch(model, HEADS, *(p.detach() if p is not None else None for p in (scale, offset)))
    with torch.no_grad():
        expected = model(IDS.to(device)).logits.float()
    remove()
    handle = load_adapter(model, tmp_path, backend="torch", trainable=False)
    with torch.no_grad():
        logits = model(IDS.to(device)).logits.float()
    torch.testing.assert_close(logits, expected, atol=tolerance("nf4-bf16-dq", mode, False, device), rtol=0)
    handle.offset.requires_grad_(True)
    if repacked:
        with pytest.raises(RuntimeError, match="repacked the 4-bit weights of .*no backward"):
            model(IDS.to(device))
    else:
        model(IDS.to(device)).logits.float().square().mean().backward()
        assert handle.offset.grad is not None


def test_prepare_kbit_training_while_an_adapter_is_attached_outlasts_the_adapter(quantizable_base, cpu, device):
    """prepare_kbit_training switches repacking off for good; an adapter attached before it must not switch it
    back on when it is removed (the model would then repack on its next evaluation and train wrongly after)."""
    model = load_quantized(quantizable_base, "nf4-bf16-dq", device).eval()
    handle = patched(model, "offset", heads=[(2, 1)])
    lofit_fast.prepare_kbit_training(model)
    handle.remove()
    assert not any(layer.support_avx512bf16_for_cpu for layer in linear4bit_modules(model).values())
    with torch.no_grad():
        model(IDS.to(device))
    assert not any(is_repacked(layer) for layer in linear4bit_modules(model).values())


def test_the_hold_on_repacking_ends_with_the_adapter(quantizable_base, cpu, device):
    """A trainable adapter keeps every 4-bit layer from repacking while it is attached; removing it gives each
    layer its own setting back (bitsandbytes' fast kernel, where the CPU has it)."""
    model = load_quantized(quantizable_base, "nf4-bf16-dq", device).eval()
    before = {key: layer.support_avx512bf16_for_cpu for key, layer in linear4bit_modules(model).items()}
    assert set(before.values()) == {cpu == "avx512bf16"}
    handle = patched(model, "offset", heads=[(2, 1)])
    assert not any(layer.support_avx512bf16_for_cpu for layer in linear4bit_modules(model).values())
    handle.remove()
    assert {key: layer.support_avx512bf16_for_cpu for key, layer in linear4bit_modules(model).items()} == before
    with torch.no_grad():
        model(IDS.to(device))
    assert all(is_repacked(layer) == (cpu == "avx512bf16") for layer in linear4bit_modules(model).values())
