"""Smoke tests of the end-to-end benchmark (lofit_fast/bench/e2e.py): the --quick run on the CPU, the
on-the-fly quantized model it builds, and the batch search."""

import importlib.util
import json

import pytest
import torch

from lofit_fast import cli
from lofit_fast.bench.common import random_heads
from lofit_fast.bench.e2e import build_quantized_model, largest_batch, llama_config, main
from lofit_fast.quantization import QuantizationInfo, quantization_info

pytest.importorskip("bitsandbytes")
HAS_PEFT = importlib.util.find_spec("peft") is not None



def test_quick_run_writes_a_row_per_impl_and_quant(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    argv = ["--quick", "--device", "cpu", "--models", "llama2-7b", "--method", "step2", "--output", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    impls = ["floor", "lofit_fast", "eager_hook"] + (["qlora"] if HAS_PEFT else [])
    assert [(row["quant"], row["impl"]) for row in result["rows"]] == [(q, i) for q in ("nf4", "int8") for i in impls]
    assert {row["method"] for row in result["rows"]} == {"step2"}
    assert result["device_type"] == "cpu" and result["quick"] and result["settings"]["dtype"] == "fp32"
    printed = capsys.readouterr().out
    assert "saved for backward" in printed and "not measured by a CPU run" in printed
    for quant in ("nf4", "int8"):
        rows = {row["impl"]: row for row in result["rows"] if row["quant"] == quant}
        floor, lofit = rows["floor"], rows["lofit_fast"]
        # 2 layers of 7B at width / 8: 4 heads of 128; K = round(48 * 2 / 32) = 3.
        assert (lofit["layers"], lofit["hidden"], lofit["k"], lofit["batch"], lofit["seq"]) == (2, 512, 3, 2, 32)
        assert lofit["trained_params"] == 3 * 128 and rows["eager_hook"]["trained_params"] == 3 * 128
        # Offsets add nothing per token over the floor: two int64 index vectors, one entry per selected column.
        assert (lofit["saved_mb"] - floor["saved_mb"]) * 2**20 == pytest.approx(2 * 8 * 3 * 128, abs=1e-6)
        if HAS_PEFT:
            # LoRA saves o_proj's input in every layer: at least 2 layers x 64 tokens x 512 x 4 bytes.
            assert (rows["qlora"]["saved_mb"] - floor["saved_mb"]) * 2**20 >= 2 * 64 * 512 * 4
            assert rows["qlora"]["trained_params"] == 2 * 8 * (512 + 512)
        for row in rows.values():
            assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] is None and row["fits_24gb"] is None


def test_quick_step1_and_step2_with_scales(tmp_path):
    """The methods where the kernels run: scales on every head (step 1, with its L1 term), and scales with offsets
    on K heads. 2 layers of 7B at width / 8: 4 heads of 128, K = 3, 2 x 32 tokens."""
    path = tmp_path / "e2e.json"
    argv = ["--quick", "--device", "cpu", "--models", "llama2-7b", "--quant", "nf4", "--method", "step1,step2-scale",
            "--impl", "floor,lofit_fast,eager_hook", "--output", str(path)]
    assert main(argv) == 0
    rows = {(row["method"], row["impl"]): row for row in json.loads(path.read_text())["rows"]}
    assert set(rows) == {(m, i) for m in ("step1", "step2-scale") for i in ("floor", "lofit_fast", "eager_hook")}
    tokens, width, head_dim = 2 * 32, 512, 128
    step1, step2 = rows["step1", "lofit_fast"], rows["step2-scale", "lofit_fast"]
    assert (step1["k"], step1["lowest_layer"], step1["trained_params"]) == (8, 0, 8 * head_dim)
    assert (step2["k"], step2["trained_params"]) == (3, 2 * 3 * head_dim)
    assert rows["step1", "eager_hook"]["trained_params"] == 8 * head_dim
    assert rows["step2-scale", "eager_hook"]["trained_params"] == 2 * 3 * head_dim

    def extra_bytes(method, impl):
        return round((rows[method, impl]["saved_mb"] - rows[method, "floor"]["saved_mb"]) * 2**20)

    # Scales on K heads: the selected heads' slice of z (fp32 here) and the scale rows the op reads, nothing more.
    assert extra_bytes("step2-scale", "lofit_fast") == tokens * 3 * head_dim * 4 + 3 * head_dim * 4
    # Every head: z itself, at most one per layer (layer 0's, which the floor does not keep), and the scales.
    assert 0 < extra_bytes("step1", "lofit_fast") <= 2 * tokens * width * 4 + 8 * head_dim * 4
    assert extra_bytes("step1", "lofit_fast") < extra_bytes("step1", "eager_hook")


def test_cli_routes_bench_e2e(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--e2e", "--help"])
    assert exit_info.value.code == 0 and "lofit bench --e2e" in capsys.readouterr().out


@pytest.mark.parametrize("quant, expected", [
    ("nf4", QuantizationInfo("nf4", double_quant=True, compute_dtype=torch.float32, num_layers=14)),
    ("int8", QuantizationInfo("int8", double_quant=False, compute_dtype=None, num_layers=14))])
def test_built_model_is_quantized_and_fully_materialized(quant, expected):
    config = llama_config("llama2-13b", layers=2, width_divisor=8)
    model = build_quantized_model(config, quant, torch.device("cpu"), torch.float32)
    assert quantization_info(model) == expected  # 2 layers x (q, k, v, o, gate, up, down)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "cpu" for t in tensors) and not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(3, 32000, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_random_heads_are_seeded_and_distinct():
    heads = random_heads(40, 40, 48, seed=0)
    assert heads == random_heads(40, 40, 48, seed=0) != random_heads(40, 40, 48, seed=1)
    assert len(set(heads)) == 48 and heads == sorted(heads)


@pytest.mark.parametrize("limit, max_batch, expected", [(13, 64, 13), (0, 64, 0), (1, 64, 1), (64, 64, 64),
                                                        (100, 64, 64)])
def test_largest_batch_search(limit, max_batch, expected):
    tried = []

    def factory(batch):
        def step():
            tried.append(batch)
            if batch > limit:
                raise torch.cuda.OutOfMemoryError(f"batch {batch}")
        return step

    assert largest_batch(factory, torch.device("cpu"), max_batch) == expected
    assert len(tried) <= 2 * max_batch.bit_length() + 1


def test_every_impl_comes_off_cleanly():
    """The GPU run attaches each implementation twice (batch search, then measurement) to one model."""
    from lofit_fast.bench.e2e import IMPLS, METHODS, attach

    config = llama_config("llama2-7b", layers=2, width_divisor=8)
    model = build_quantized_model(config, "nf4", torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 32000, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
    modules = [(name, type(module)) for name, module in model.named_modules()]
    for method in METHODS:
        for impl in IMPLS if HAS_PEFT else IMPLS[:-1]:
            attached = attach(impl, model, [(1, 2), (0, 3)], method)
            attached.detach()
            what = f"{method} {impl}"
            assert [(name, type(module)) for name, module in model.named_modules()] == modules, what
            assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules()), what
            with torch.no_grad():
                assert torch.equal(model(ids).logits, expected), what
