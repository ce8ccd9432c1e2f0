"""The multi-adapter benchmark (lofit_fast/bench/multi.py): a smoke run on a tiny model on the CPU, and its JSON."""

import json
import os

from lofit_fast.bench import multi as multi_adapter_benchmark


def test_smoke_run_writes_json(tmp_path):
    argv = ["--layers", "2", "--hidden", "64", "--heads", "4", "--intermediate", "96", "--vocab", "128",
            "--batch", "4", "--seq", "8", "--new-tokens", "2", "--adapters", "2", "--kinds", "offset,scale+offset",
            "--heads-per-adapter", "3", "--rounds", "1", "--device", "cpu", "--backend", "torch",
            "--output", str(tmp_path)]
    assert multi_adapter_benchmark.main(argv) == 0
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("multi-adapter-") and files[0].endswith(".json")
    result = json.loads((tmp_path / files[0]).read_text())
    for key in ("device", "date", "dtype", "model", "rows"):
        assert key in result
    # 2 modes (prefill, generate) x 2 kinds x 1 adapter count x 2 strategies, and a base row per mode
    assert len(result["rows"]) == 2 * 2 * 2 + 2
    for row in result["rows"]:
        assert row["mode"] in ("prefill", "generate") and row["strategy"] in ("mixed", "sequential", "base")
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and len(row["round_ms"]) == 1
    assert {row["kind"] for row in result["rows"] if row["strategy"] != "base"} == {"offset", "scale+offset"}
