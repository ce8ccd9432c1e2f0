"""LoFiT trained by two CPU processes (gloo) gives the same parameters as one process over the same data.

tests/distributed_worker.py is launched once with torch.distributed.run: two ranks of PER_RANK_BATCH rows
each run three modes in turn (the imports are paid once), data parallel through accelerate (DDP), FSDP2
(`fully_shard` per decoder layer plus the root, which holds `model.lofit`) and `lofit_fast.tune`
(Trainer). Each test checks one mode: the ranks end bitwise equal, they match a single-process run over
the same global batches, and the base weights are untouched. Plain SGD in the first two keeps the update
linear in the gradient, so the only difference is the all-reduce's rounding (~1e-8): the tolerance is
1e-5, while training moves every parameter tensor by more than 1e-3.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from helpers import tiny_model

WORKER = Path(__file__).with_name("distributed_worker.py")
MODES = ("dp", "fsdp", "tune")
LAUNCH_TIMEOUT_S = 180
TOLERANCE = 1e-5  # fp32, 4 SGD steps; observed differences are 1e-8 to 3e-8
MIN_MOVE = 1e-3  # how far training must move each parameter tensor for the comparison to mean something


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(out_dir: Path) -> str:
    """Run the worker's MODES on two ranks; returns their combined output (for failure messages)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(worker.WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(WORKER), ",".join(MODES), str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::DeprecationWarning")
    # Own session, so that a timeout can stop torchrun's children too.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=WORKER.parent, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the two workers did not finish in {LAUNCH_TIMEOUT_S} s; output:\n{output[-8000:]}")
    assert process.returncode == 0, f"workers failed (exit {process.returncode}); output:\n{output[-8000:]}"
    return output


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """`two_processes(mode)`: what rank 0 and rank 1 saved for `mode`."""
    out_dir = tmp_path_factory.mktemp("distributed")
    output = launch(out_dir)

    def results(mode: str) -> list[dict]:
        paths = [out_dir / f"{mode}_rank{rank}.pt" for rank in range(worker.WORLD_SIZE)]
        missing = [path.name for path in paths if not path.exists()]
        assert not missing, f"{mode}: the workers wrote no {missing}; output:\n{output[-8000:]}"
        return [torch.load(path) for path in paths]

    return results


@pytest.fixture(scope="module")
def single_process():
    return worker.train_single_process()


@pytest.fixture(scope="module")
def initial():
    _, handle = worker.build_model()
    return {"scale": handle.scale.detach().clone(), "offset": handle.offset.detach().clone()}


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_ranks_match_single_process(ranks, single_process, initial):
    first, second = ranks
    for name in ("scale", "offset"):
        assert torch.equal(first[name], second[name]), \
            f"{name} differs between ranks by {max_difference(first[name], second[name])}"
        assert max_difference(single_process[name], initial[name]) > MIN_MOVE, f"training did not move {name}"
        assert torch.allclose(first[name], single_process[name], rtol=0, atol=TOLERANCE), \
            f"{name}: 2 processes vs 1 differ by {max_difference(first[name], single_process[name])}"
    # Each step's global loss is the mean of the ranks' losses: the ranks saw the single run's batches.
    mean_losses = [sum(losses) / len(losses) for losses in zip(first["losses"], second["losses"])]
    assert mean_losses == pytest.approx(single_process["losses"], abs=TOLERANCE)


def check_base_unchanged(ranks):
    base = {name: p for name, p in tiny_model("llama", seed=0).named_parameters()}
    for saved in ranks:
        assert saved["base"].keys() == base.keys()
        for name, parameter in base.items():
            assert torch.equal(saved["base"][name], parameter), f"base weight {name} changed"


def test_data_parallel_with_accelerate_matches_single_process(two_processes, single_process, initial):
    ranks = two_processes("dp")
    assert ranks[0]["wrapper"] == "DistributedDataParallel" and ranks[0]["backend"] == "gloo"
    check_ranks_match_single_process(ranks, single_process, initial)
    check_base_unchanged(ranks)


def test_fsdp2_fully_shard_matches_single_process(two_processes, single_process, initial):
    ranks = two_processes("fsdp")
    # K = 5 rows of scale, sharded unevenly over the two ranks: 3 + 2.
    assert [saved["sharded_scale_rows"] for saved in ranks] == [3, 2]
    check_ranks_match_single_process(ranks, single_process, initial)
    check_base_unchanged(ranks)


def test_tune_with_trainer_on_two_processes_matches_one(two_processes, tmp_path):
    """Trainer under torch.distributed.run (DDP over gloo): the ranks agree, and equal one process with
    the global batch: Trainer's seeded sampler gives the same global order either way. Trainer's AdamW
    divides by sqrt(v), which can amplify rounding, but observed differences stay ~2e-8."""
    from lofit_fast.training import StepSettings, tune

    ranks = two_processes("tune")
    assert [saved["world_size"] for saved in ranks] == [2, 2]
    assert torch.equal(ranks[0]["offset"], ranks[1]["offset"])
    check_base_unchanged(ranks)

    model = tiny_model("llama", seed=0)
    settings = StepSettings(learning_rate=1e-2, num_train_epochs=1,
                            per_device_train_batch_size=worker.WORLD_SIZE * worker.PER_RANK_BATCH)
    handle = tune(model, worker.training_rows(), worker.stack_rows, heads=worker.HEADS, settings=settings,
                  backend="torch", output_dir=str(tmp_path / "single"),
                  training_args={"disable_tqdm": True, "logging_strategy": "no"})
    initial_offset = (torch.randn(handle.offset.shape, generator=torch.Generator().manual_seed(settings.seed))
                      * settings.init_std)
    assert max_difference(handle.offset.detach(), initial_offset) > MIN_MOVE
    assert torch.allclose(ranks[0]["offset"], handle.offset.detach(), rtol=0, atol=TOLERANCE), \
        f"2 processes vs 1 differ by {max_difference(ranks[0]['offset'], handle.offset.detach())}"
