"""The static report (`lofit bench --static`): its model on hand values, and one forward and one backward case
compiled for sm_90 with the properties the kernels are built for (no spills, 128-bit stream accesses, no
reduction or layout conversion inside a loop, one memory round trip per iteration)."""

import json

import pytest

from lofit_fast import cli
from lofit_fast.bench import static as static_report
from lofit_fast.bench.static import CASES, predicted_fraction, resident_blocks, traffic

H100 = dict(multiprocessors=132, max_warps=64, max_blocks=32, registers=65536, shared_kib=228)


def test_resident_blocks_from_registers_warps_and_shared_memory():
    # 64 registers x 32 lanes = 2048 a warp; 65536 / 2048 = 32 warps = 8 blocks of 4 warps.
    assert resident_blocks(64, 4, 0, H100) == (8, 8, "registers")
    # 41 registers round up to 48 a thread (units of 256 a warp): 65536 / 1536 = 42 warps = 10 blocks of 4.
    assert resident_blocks(41, 4, 0, H100) == (10, 10, "registers")
    assert resident_blocks(40, 4, 0, H100) == (12, 12, "registers")  # 1280 a warp: 51 warps
    # Few registers: 64 warps a multiprocessor at most, 16 blocks of 4 warps.
    assert resident_blocks(16, 4, 0, H100) == (16, 32, "warps")
    # 100 KB of shared memory a block (+1 KB reserved): two fit in 228 KB.
    assert resident_blocks(32, 4, 100 * 1024, H100)[0::2] == (2, "shared memory")


def test_traffic_adds_the_partial_sums_to_the_floor():
    forward = next(case for case in CASES if case.name == "step1-forward")
    assert traffic(forward, 4, 8, 10, 2, 0) == (2 * 10 * 32 * 2 + 4 * 8 * 4,) * 2  # read z, write z', read A
    lowest = next(case for case in CASES if case.name == "lowest-backward")  # K = 2, grid over the 2 slots
    moved, floor = traffic(lowest, 4, 8, 10, 2, partial_rows=3)
    assert floor == 10 * 2 * 8 * 2 * 2 + 2 * 8 * 4 * 3  # read g's and z's slices (no grad_z); read A, write dA, dv
    assert moved - floor == 3 * 2 * 8 * 4 * 2 * 2  # 3 chunks x 2 slots, written then read, for dA and dv
    middle = next(case for case in CASES if case.name == "step2s-backward")  # grad_z: a column per head
    moved, floor = traffic(middle, 4, 8, 10, 2, partial_rows=3)
    assert floor == 2 * 10 * 32 * 2 + 10 * 2 * 8 * 2 + 2 * 8 * 4 * 3  # g in, grad_z out, the saved slice; A, dA, dv
    assert moved - floor == 3 * 2 * 8 * 4 * 4 * 2  # the 2 selected heads' rows also gathered before the sum


def test_prediction_is_the_traffic_ratio_when_bandwidth_bound_and_drops_when_latency_bound():
    # Plenty in flight: the ratio of bytes alone.
    saturated = predicted_fraction(1100, 1000, 0.5, 16384, 1, 700.0, 0.0, 8, 132 * 8 * 4, 132, 3350.0)
    assert saturated["predicted_pct_of_copy"] == pytest.approx(100 * 1000 / 1100)
    # One small tile a program, one program a multiprocessor: far from the bandwidth.
    starved = predicted_fraction(1000, 1000, 0.5, 1024, 1, 700.0, 0.0, 1, 132, 132, 3350.0)
    assert starved["predicted_pct_of_copy"] == pytest.approx(100 * 1024 / 700 / (3350 * 0.5 / 132))
    # Half a wave more than a whole one costs time at lower concurrency.
    ragged = predicted_fraction(1000, 1000, 0.5, 4096, 1, 700.0, 0.0, 4, int(132 * 4 * 1.5), 132, 3350.0)
    assert ragged["predicted_pct_of_copy"] < 100


def test_training_cases_compile_to_what_the_kernels_promise(tmp_path):
    path = tmp_path / "static.json"
    argv = ["--target", "90", "--case", "step2s-forward,step2s-backward", "--shape", "llama2-7b", "--tokens", "4k",
            "--output", str(path)]
    assert static_report.main(argv) == 0
    result = json.loads(path.read_text())
    assert result["target"] == "sm_90" and "not a measurement" in result["kind"]
    rows = result["rows"]
    assert {row["case"] for row in rows} == {"step2s-forward", "step2s-backward"}
    assert sum(row["deterministic_config"] for row in rows) == 2  # one fixed config per case
    for row in rows:
        what = f"{row['case']} T{row['block_t']} w{row['num_warps']}"
        assert not row["spills"], what
        assert row["width_source"] == "sass" and row["min_stream_bits"] == 128, (what, row["stream_access_bits"])
        assert row["reductions_in_loops"] == 0 and row["conversions_in_loops"] == 0, what
        assert row["round_trips"] == 1, what
        assert row["reductions"] == (1 if row["kernel"] == "forward" else 2), what  # slot lookup (+ the sums)
        assert 0 < row["predicted_pct_of_copy"] <= 100 and row["bytes"] >= row["min_bytes"], what


def test_cli_routes_bench_static(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--static", "--help"])
    assert exit_info.value.code == 0 and "lofit bench --static" in capsys.readouterr().out
