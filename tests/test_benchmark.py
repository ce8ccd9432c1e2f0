"""The kernel benchmark (lofit_fast/bench/kernels.py): a quick smoke run on tiny shapes, its JSON, and the byte counts
it divides by (lofit_fast/bench/common.py)."""

import datetime
import json
import os

import pytest
import torch

from lofit_fast.bench import common
from lofit_fast.bench import kernels as kernel_benchmark
from lofit_fast.ops import head_affine_reference

REQUIRED_ROW_KEYS = ("impl", "mode", "shape", "ms", "gbps", "peak_mb")


def _single_json(directory):
    files = [name for name in os.listdir(directory) if name.endswith(".json")]
    assert len(files) == 1, files
    with open(os.path.join(directory, files[0])) as handle:
        return files[0], json.load(handle)


def _check_result(result, expected_rows):
    for key in ("device", "date", "copy_gbps", "rows"):
        assert key in result
    assert result["copy_gbps"] > 0
    assert len(result["rows"]) == expected_rows
    for row in result["rows"]:
        for key in REQUIRED_ROW_KEYS:
            assert key in row, key
        for key in ("ms", "gbps", "peak_mb", "host_ms"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        # On the CPU there is no device time apart from the host's: one wall-clock figure in both columns.
        assert row["timing"] == "wall" and row["host_ms"] == row["ms"]


def test_quick_run_writes_the_json_contract(tmp_path):
    argv = ["--quick", "--impl", "eager_hook,torch", "--output", str(tmp_path), "--device", "cpu", "--threads", "1"]
    assert kernel_benchmark.main(argv) == 0
    name, result = _single_json(tmp_path)
    today = datetime.date.today().isoformat()
    assert name == f"{common.file_safe(result['device'])}-{today}.json"
    assert result["date"] == today
    # 2 impls x 3 modes x 1 shape x 1 token count x 2 values of K
    _check_result(result, 2 * 3 * 2)
    assert {row["impl"] for row in result["rows"]} == {"eager_hook", "torch"}
    assert {row["k"] for row in result["rows"]} == {2, 8}


def test_quick_torch_compile_row(tmp_path):
    """torch.compile of the torch path through Inductor's C++ backend: one case (compiling is the slow part), the
    modes that time a whole step and a backward alone (run again on one graph, which a backward that donates its
    saved buffers refuses)."""
    path = tmp_path / "compile.json"
    argv = ["--quick", "--impl", "torch_compile", "--k", "2", "--mode", "full,backward", "--output", str(path),
            "--device", "cpu", "--threads", "1"]
    assert kernel_benchmark.main(argv) == 0
    with open(path) as handle:
        result = json.load(handle)
    _check_result(result, 2)


def test_cpu_target_on_a_tiny_layer(tmp_path, monkeypatch):
    """The --cpu-target protocol (rounds, overheads over o_proj, ratios) on an 8-head layer of 64 tokens."""
    for name, value in (("TARGET_HEADS", 8), ("TARGET_HEAD_DIM", 16), ("TARGET_BATCH", 2), ("TARGET_SEQ", 32)):
        monkeypatch.setattr(kernel_benchmark, name, value)
    path = tmp_path / "target.json"
    assert kernel_benchmark.main(["--cpu-target", "--rounds", "2", "--threads", "1", "--output", str(path)]) == 0
    with open(path) as handle:
        result = json.load(handle)
    assert {row["mode"] for row in result["rows"]} == {"full_over_o_proj"}
    assert {(row["impl"], row["k"], row["params"]) for row in result["rows"]} == {
        ("eager_hook", 2, "scale+offset"), ("torch", 2, "scale+offset"), ("eager_hook", 8, "scale+offset"),
        ("torch", 8, "scale+offset"), ("torch", 2, "offset"), ("torch", 2, "offset-folded")}
    for row in result["rows"]:
        assert len(row["round_overhead_ms"]) == 2 and row["total_ms"] > 0
    ratios = result["cpu_target"]["ratios"]
    assert ratios["k2"]["target"] == 40 and ratios["all"]["target"] == 20
    assert set(ratios) == {"k2", "all", "k2_offset", "k2_offset-folded"}


@pytest.mark.parametrize("mode, k, scale, offset, expected", [
    # N=10 tokens, H=4 heads, D=8, bf16 (e=2): z is 10*32*2 = 640 bytes, the K=2 slice 320, a parameter 64.
    ("forward", 2, True, True, 2 * 640 + 320 + 2 * 64),        # read z, write z', save slice, read A and v
    ("backward", 2, True, True, 2 * 640 + 320 + 3 * 64),       # read g, write grad_z, read slice; A; dA, dv
    ("full", 2, True, True, (2 * 640 + 320 + 2 * 64) + (2 * 640 + 320 + 3 * 64)),
    ("forward", 4, True, True, 2 * 640 + 2 * 128),             # all heads: z itself is saved, no copy
    ("backward", 4, True, True, 2 * 640 + 640 + 3 * 128),
    ("forward", 2, False, True, 2 * 640 + 64),                 # offset only: nothing saved
    ("backward", 2, False, True, 320 + 64),                    # grad_z is g; read g's slice, write dv
    ("backward", 2, True, False, 2 * 640 + 320 + 2 * 64),      # scale only: read A, write dA
])
def test_op_bytes_hand_values(mode, k, scale, offset, expected):
    assert common.op_bytes(mode, 10, 4, 8, k, 2, scale=scale, offset=offset) == expected


def test_eager_hook_baseline_computes_lofit():
    """The paper's loop (every head, frozen identity pairs on the unselected ones) equals the reference."""
    torch.manual_seed(0)
    num_heads, head_dim, heads = 4, 8, [1, 3]
    z = torch.randn(2, 5, num_heads * head_dim, dtype=torch.float64)
    scale, offset = torch.randn(2, head_dim, dtype=torch.float64), torch.randn(2, head_dim, dtype=torch.float64)
    scales = [torch.zeros(head_dim, dtype=torch.float64) for _ in range(num_heads)]
    offsets = [torch.zeros(head_dim, dtype=torch.float64) for _ in range(num_heads)]
    for slot, head in enumerate(heads):
        scales[head], offsets[head] = scale[slot], offset[slot]
    expected = head_affine_reference(z, torch.tensor(heads), scale, offset)
    torch.testing.assert_close(common.eager_hook_transform(z, scales, offsets), expected)


def test_selected_heads_are_spread_and_distinct():
    assert common.selected_heads(32, 2) == [8, 24]
    assert common.selected_heads(16, 16) == list(range(16))
    assert len(set(common.selected_heads(40, 7))) == 7


def test_output_path_and_file_safe_device_name():
    assert common.file_safe("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.file_safe("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"
    assert common.output_path("out/r.json", "x", "2025-01-01") == "out/r.json"
    assert common.output_path("out", "AMD EPYC", "2025-01-01") == os.path.join("out", "amd-epyc-2025-01-01.json")
    assert common.output_path("out", "sm90", "2025-01-01", prefix="static-") == os.path.join(
        "out", "static-sm90-2025-01-01.json")


def test_interleaved_rounds_rotate_the_order_after_an_untimed_warm_up():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = common.interleaved_ms(calls, 2, torch.device("cpu"))
    assert order == list("abc" "bca" "cab") and {name: len(values) for name, values in times.items()} == dict(
        a=2, b=2, c=2)


def test_aligned_table_aligns_text_left_and_numbers_right():
    lines = common.aligned_table(("name", "ms"), [("a", "1.5"), ("long", "12")], left_columns=(0,))
    assert lines == ["name   ms", "---------", "a     1.5", "long   12"]
