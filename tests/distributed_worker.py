"""One process of a two-process CPU (gloo) LoFiT training run, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODES OUT_DIR

MODES is a comma-separated list, run in turn in the same processes (the imports are paid once):
"dp" (data parallel: `accelerate.Accelerator(cpu=True)` prepares model, optimizer and data loader,
so the model is wrapped in DistributedDataParallel), "fsdp" (FSDP2: `fully_shard` on every decoder
layer, then on the root, which holds `model.lofit`), "tune" (`lofit_fast.tune`, i.e.
transformers.Trainer, on every rank). Each rank writes `OUT_DIR/{mode}_rank{R}.pt`: its final LoFiT
parameters, the base model's weights and the losses it saw.

The model, the data and the single-process reference run (`train_single_process`) live here too, so
the test and the workers build exactly the same things.
"""

import os
import sys

import torch

from helpers import tiny_model

# Five heads over three layers: an odd K, so FSDP shards the (K, head_dim) rows unevenly.
HEADS = [(0, 1), (1, 3), (1, 4), (2, 0), (2, 5)]
WORLD_SIZE = 2
PER_RANK_BATCH = 2
STEPS = 4
LEARNING_RATE = 1.0  # plain SGD: the update is linear in the gradient, so all-reduce rounding stays ~1e-8
SEQUENCE_LENGTH = 10


def build_model():
    """The seeded tiny llama with LoFiT (scale and offset) on HEADS, both started away from zero."""
    import lofit_fast

    model = tiny_model("llama", seed=0)
    handle = lofit_fast.patch_model(model, heads=HEADS, scale=True, offset=True, backend="torch")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        handle.scale.copy_(0.1 * torch.randn(handle.scale.shape, generator=generator))
        handle.offset.copy_(0.1 * torch.randn(handle.offset.shape, generator=generator))
    model.train()
    return model, handle


def training_rows():
    """STEPS * WORLD_SIZE * PER_RANK_BATCH rows of equal length, no padding, every token labelled: each
    rank's mean token loss has the same weight, so the mean over ranks is the global batch's mean."""
    count = STEPS * WORLD_SIZE * PER_RANK_BATCH
    ids = torch.randint(3, 97, (count, SEQUENCE_LENGTH), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def stack_rows(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def lofit_state(handle) -> dict:
    return {"scale": handle.scale.detach().clone(), "offset": handle.offset.detach().clone()}


def base_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("lofit.")}


def train_single_process() -> dict:
    """The reference: one process, global batches of WORLD_SIZE * PER_RANK_BATCH rows, in order."""
    model, handle = build_model()
    optimizer = torch.optim.SGD(list(handle.lofit.parameters()), lr=LEARNING_RATE)
    rows, global_batch = training_rows(), WORLD_SIZE * PER_RANK_BATCH
    losses = []
    for start in range(0, len(rows), global_batch):
        loss = model(**stack_rows(rows[start:start + global_batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {**lofit_state(handle), "base": base_state(model), "losses": losses}


def train_data_parallel() -> dict:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    model, handle = build_model()
    optimizer = torch.optim.SGD(list(handle.lofit.parameters()), lr=LEARNING_RATE)
    # Not shuffled: the prepared loader gives rank r the batches r, r + WORLD_SIZE, ... of this one, so
    # step s covers rows [s * global_batch, (s + 1) * global_batch), as in train_single_process.
    loader = DataLoader(training_rows(), batch_size=PER_RANK_BATCH, shuffle=False, collate_fn=stack_rows)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    unwrapped = accelerator.unwrap_model(model)
    return {**lofit_state(handle), "base": base_state(unwrapped), "losses": losses,
            "wrapper": type(model).__name__, "backend": accelerator.state.backend}


def train_fsdp2() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():  # when run after "dp", accelerate has already set up the group
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, handle = build_model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, lm_head and model.lofit
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    rows, global_batch = training_rows(), world * PER_RANK_BATCH
    losses = []
    for start in range(0, len(rows), global_batch):
        mine = rows[start + rank * PER_RANK_BATCH:start + (rank + 1) * PER_RANK_BATCH]
        loss = model(**stack_rows(mine)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # Parameters are DTensors sharded on dim 0; full_tensor() all-gathers them.
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return {"scale": full.pop("lofit.scale"), "offset": full.pop("lofit.offset"), "base": full,
            "losses": losses, "wrapper": type(model).__name__,
            "sharded_scale_rows": handle.scale.to_local().shape[0]}


def train_with_tune(out_dir: str) -> dict:
    from lofit_fast.training import StepSettings, tune

    model = tiny_model("llama", seed=0)
    settings = StepSettings(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=PER_RANK_BATCH)
    handle = tune(model, training_rows(), stack_rows, heads=HEADS, settings=settings, backend="torch",
                  output_dir=os.path.join(out_dir, "tune_output"),
                  training_args={"disable_tqdm": True, "logging_strategy": "no", "ddp_backend": "gloo",
                                 # every LoFiT parameter is used in every step: skip DDP's unused-parameter search
                                 "ddp_find_unused_parameters": False})
    return {"offset": handle.offset.detach().clone(), "base": base_state(model),
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def main(modes: str, out_dir: str) -> None:
    """Run each comma-separated mode in turn (one launch pays the imports once) and save its result."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    trainers = {"dp": train_data_parallel, "fsdp": train_fsdp2, "tune": lambda: train_with_tune(out_dir)}
    for mode in modes.split(","):
        result = trainers[mode]()
        torch.save(result, os.path.join(out_dir, f"{mode}_rank{os.environ['RANK']}.pt"))
        print(f"rank {os.environ['RANK']}: {mode} done", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
