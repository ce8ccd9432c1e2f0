"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps on the CPU at toy sizes, into one folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def test_dry_run_writes_the_folder(tmp_path):
    folder = tmp_path / "check"
    environment = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", SCRIPT, "--dry-run", str(folder)], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(os.listdir(folder))
    assert files == ["e2e.json", "e2e.log", "kernels.json", "kernels.log", "summary.txt", "tests.log"]
    summary = (folder / "summary.txt").read_text()
    for name in ("tests", "kernels", "e2e"):
        assert f"{name}: exit 0," in summary, summary
    assert "failed steps: 0" in summary and "dry_run=1" in summary
    assert " passed" in (folder / "tests.log").read_text()
    kernels = json.loads((folder / "kernels.json").read_text())
    assert {row["impl"] for row in kernels["rows"]} == {"torch", "eager_hook"}
    e2e = json.loads((folder / "e2e.json").read_text())
    assert {(row["method"], row["impl"]) for row in e2e["rows"]} == {
        (method, impl) for method in ("step1", "step2") for impl in ("floor", "lofit_fast")}
    assert {row["model"] for row in e2e["rows"]} == {"llama2-13b"}


def test_without_a_gpu_it_points_at_the_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run the real check")
    environment = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", SCRIPT, str(tmp_path / "check")], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--dry-run" in result.stderr
