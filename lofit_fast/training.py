"""The two LoFiT steps, trained with `transformers.Trainer`.

Step 1, `select_heads`: learn a scale on every head with an L1 penalty, rank heads by ||A_lh||_2
(or, as the paper's baselines, a random order or linear probes' accuracy: `probing.probe_ranking`).
Step 2, `tune`: from the frozen base, learn offsets on the top-K heads of a ranking.

Both losses come in two flavours: "sft" (the model's own loss on labels, prompt tokens masked to
-100 by the collator) and "dpo" (pairs scored against the base model with LoFiT switched off, its
log-probabilities computed once before training). Logging, progress bars, gradient accumulation,
mixed precision, checkpoints and resume all come from Trainer (checkpoints hold the adapter:
`LofitCheckpointing`); the base stays frozen, so the optimizer only ever sees LoFiT's parameters.
`paper_settings` gives the paper's settings for a task and model.
"""

import contextlib
import math
import os
from dataclasses import asdict
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback

from .adapter import load_adapter_values
from .bnb import compute_dtypes_4bit
from .data import training_subset
from .losses import dpo_loss, sequence_logprobs
from .patch import LofitHandle, attention_shape, handle_of, patch_model
from .quantization import prepare_kbit_training
from .ranking import LOCALIZERS, HeadRanking, random_ranking, resolve_k  # noqa: F401 (public names of this module)
from .settings import (  # noqa: F401 (public names of this module)
    DEFAULT_SETTINGS,
    GENERIC_TASK_SETTINGS,
    PAPER_MODEL_SHAPES,
    PAPER_SETTINGS,
    PAPER_SETTINGS_BY_MODEL,
    StepSettings,
    paper_settings,
)

LOSSES = ("sft", "dpo")


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class LofitCheckpointing:
    """Makes a transformers Trainer checkpoint the LoFiT adapter of its model instead of the model.

    Mix it in ahead of the Trainer class (`class MyTrainer(LofitCheckpointing, trl.SFTTrainer): pass`); the
    model is a `LofitModel`, or a model patched by `patch_model` / `load_adapter`. Checkpoints and `save_model()`
    then hold adapter_config.json and adapter_model.safetensors (what `load_adapter` and
    `LofitModel.from_pretrained` read) beside Trainer's optimizer, scheduler, RNG and trainer state, and
    `train(resume_from_checkpoint=...)` / `load_best_model_at_end` load the adapter's values back. Without it,
    Trainer writes the whole base model into every checkpoint (and fails on tied embeddings for a LofitModel).
    """

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        handle_of(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_values(handle_of(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_values(handle_of(self.model), self.state.best_model_checkpoint)


class LofitTrainer(LofitCheckpointing, Trainer):
    """Trainer with LoFiT's losses: SFT or DPO, plus `l1_lambda * sum|A|` on the scales; checkpoints hold the
    adapter (`LofitCheckpointing`)."""

    def __init__(self, *args, handle: LofitHandle, loss: str, l1_lambda: float = 0.0, dpo_beta: float = 0.5,
                 **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
        self.handle, self.loss_kind, self.l1_lambda, self.dpo_beta = handle, loss, l1_lambda, dpo_beta
        with _allow_quantized_training(kwargs.get("model") or args[0]):
            super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_kind == "sft":
            model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels") if key in inputs}
            # Trainer's own: with num_items_in_batch (transformers 5) the model averages over the answer tokens of
            # the whole accumulated batch, and Trainer then does not divide by the accumulation steps.
            loss, outputs = super().compute_loss(model, model_inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        else:
            chosen = _pair_logprobs(model, inputs, "chosen")
            rejected = _pair_logprobs(model, inputs, "rejected")
            loss = dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                            beta=self.dpo_beta)
            outputs = None
        if self.l1_lambda and self.handle.scale is not None:
            penalty = self.l1_lambda * self.handle.scale.abs().sum()
            if model.training and self._loss_is_scaled_for_accumulation(num_items_in_batch):
                # Added on every micro-batch of the step, and not divided by Trainer: once per step in all.
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Trainer.training_step's test of whether it leaves the loss undivided by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None


def _pair_logprobs(model, inputs, side: str) -> torch.Tensor:
    logits = model(input_ids=inputs[f"{side}_input_ids"], attention_mask=inputs[f"{side}_attention_mask"]).logits
    return sequence_logprobs(logits, inputs[f"{side}_labels"])


@contextlib.contextmanager
def _allow_quantized_training(model):
    """Trainer refuses a bitsandbytes model unless it carries trainable adapters, and recognises only
    PEFT's. `_hf_peft_config_loaded` is transformers' flag for "adapters are attached"; LoFiT is one, so
    the flag is raised while Trainer validates the model, then put back."""
    if not getattr(model, "is_quantized", False):
        yield
        return
    previous = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = previous


def training_arguments(output_dir: str, settings: StepSettings, overrides: Optional[dict]) -> TrainingArguments:
    arguments = dict(
        output_dir=output_dir,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        seed=settings.seed,
        weight_decay=0.0,
        lr_scheduler_type="linear",  # the paper's (TrainingArguments' default): linear decay to 0, no warmup
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # DPO batches carry keys the model's forward does not take
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    arguments.update(overrides or {})
    return TrainingArguments(**arguments)


def _train(handle: LofitHandle, train_dataset, data_collator, loss: str, settings: StepSettings,
           output_dir: str, training_args: Optional[dict], resume_from_checkpoint=None):
    arguments = training_arguments(output_dir, settings, training_args)
    _prepare_for_training(handle.model, arguments)  # before the DPO reference pass (see the function)
    trainer = LofitTrainer(
        model=handle.model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=data_collator,
        handle=handle,
        loss=loss,
        l1_lambda=settings.l1_lambda,
        dpo_beta=settings.dpo_beta,
    )
    _refuse_float16_without_loss_scaling(handle.model, trainer)
    if loss == "dpo":
        # Under the autocast of mixed precision, as the policy runs: else an untrained adapter's margin is not 0.
        with trainer.accelerator.autocast():
            trainer.train_dataset = with_reference_logprobs(handle, train_dataset, data_collator,
                                                            settings.per_device_train_batch_size)
    quiet_when_asked(trainer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def quiet_when_asked(trainer: Trainer) -> None:
    """A Trainer asked to be quiet (no progress bars, no logging) prints nothing: without this, PrinterCallback
    still prints the end-of-training summary."""
    if trainer.args.disable_tqdm and trainer.args.logging_strategy == "no":
        trainer.remove_callback(PrinterCallback)


def _refuse_float16_without_loss_scaling(model: nn.Module, trainer: Trainer) -> None:
    """ValueError if the model computes in float16 and the run has no loss scaling (Trainer's fp16 mixed
    precision has a GradScaler on GPUs only): gradients below float16's range would silently become 0."""
    dtypes = {p.dtype for p in model.parameters()} | compute_dtypes_4bit(model)
    if torch.float16 in dtypes and trainer.accelerator.scaler is None:
        raise ValueError(
            "the model computes in float16, and this run has no loss scaling: small gradients would underflow to 0. "
            "Load the model in float32 or bfloat16 (lofit: --dtype float32 or bfloat16; the paper trains Llama 2-7B "
            "in fp32, 13B and Gemma in bf16), give a 4-bit base bnb_4bit_compute_dtype=torch.bfloat16, or, on a GPU, "
            "pass training_args={'fp16': True} (lofit: --fp16) for mixed precision with loss scaling")


def _prepare_for_training(model: nn.Module, arguments: TrainingArguments) -> None:
    """`prepare_kbit_training` (before any eval-mode pass, which could repack 4-bit CPU weights for a kernel
    without backward), with gradient checkpointing taken over from Trainer: Trainer's makes the embeddings'
    output require grad, so backward would run through every layer, not only those above the lowest
    selected head. Ours is non-reentrant and needs no such hook."""
    checkpointing = getattr(arguments, "activation_checkpointing", None) or arguments.gradient_checkpointing
    kwargs = getattr(arguments, "activation_checkpointing_kwargs", None) or arguments.gradient_checkpointing_kwargs
    prepare_kbit_training(model, gradient_checkpointing=bool(checkpointing), gradient_checkpointing_kwargs=kwargs)
    if hasattr(arguments, "activation_checkpointing"):
        arguments.activation_checkpointing = False
    arguments.gradient_checkpointing = False


@torch.no_grad()
def with_reference_logprobs(handle: LofitHandle, dataset, data_collator, batch_size: int) -> list:
    """The DPO reference: log-probabilities of each pair under the base model (LoFiT off), computed once.
    Returns the examples with `ref_chosen_logps` / `ref_rejected_logps` added. Call it under the autocast that
    the policy's forward runs in (`Trainer.accelerator.autocast()`, as `tune` and `select_heads` do)."""
    model = handle.model
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    examples = [dict(example) for example in dataset]
    with handle.disabled():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {key: value.to(device) if torch.is_tensor(value) else value
                     for key, value in data_collator(chunk).items()}
            chosen = _pair_logprobs(model, batch, "chosen").float().cpu()
            rejected = _pair_logprobs(model, batch, "rejected").float().cpu()
            for example, chosen_logp, rejected_logp in zip(chunk, chosen, rejected):
                example["ref_chosen_logps"] = chosen_logp
                example["ref_rejected_logps"] = rejected_logp
    model.train(was_training)
    return examples


# ----------------------------------------------------------------------------------------------
# Step 1: head selection
# ----------------------------------------------------------------------------------------------

def select_heads(model: nn.Module, train_dataset, data_collator, *, loss: str = "sft",
                 settings: Optional[StepSettings] = None, localizer: str = "lofit",
                 output_dir: str = "lofit_output/select", training_args: Optional[dict] = None,
                 backend: str = "auto") -> HeadRanking:
    """Step 1: rank every attention head of `model` for the task; saves `output_dir/ranking.json`.

    Args:
        model: a Hugging Face causal LM (plain or bitsandbytes); left as it was afterwards.
        train_dataset, data_collator: tokenized rows (`data.tokenize_sft` / `tokenize_preference`) and their
            collator (`data.SFTCollator` / `PreferenceCollator`).
        loss: "sft" (loss on the answer tokens) or "dpo" (against the base model with LoFiT off, beta 0.5).
        settings: learning rate, L1, epochs, batch, seed, train_size (default: the paper's for the model's
            shape, `paper_settings(None, model=model)`).
        localizer: "lofit", "random" or "probe" (below).
        output_dir: where ranking.json (and Trainer's files) go.
        training_args: overrides of transformers.TrainingArguments.
        backend: "auto", "torch" or "triton" (see `lofit_fast.ops.head_affine`).

    localizer "lofit" trains a scale on every head (init Normal(0, init_std)) with loss
    task + l1_lambda * sum|A| and scores each head by ||A_lh||_2; "random" is the seeded baseline;
    "probe" scores each head by a linear probe's validation accuracy (`probing.probe_ranking`, with
    settings.per_device_train_batch_size as its batch size and settings.seed; nothing is trained in the model).
    With settings.train_size, a seeded subset of `train_dataset` is used (`data.training_subset`).
    The model is left as it was (LoFiT removed, flags restored).
    """
    if localizer not in LOCALIZERS:
        raise ValueError(f"localizer={localizer!r} is not one of {LOCALIZERS}")
    settings = settings or paper_settings(None, model=model)["select"]
    if localizer != "random":
        train_dataset = training_subset(train_dataset, settings.train_size, settings.seed)
    if localizer == "random":
        ranking = random_ranking(model, settings.seed)
    elif localizer == "probe":
        from .probing import probe_ranking  # imported here: fitting probes needs none of this module
        ranking = probe_ranking(model, train_dataset, data_collator,
                                batch_size=settings.per_device_train_batch_size, seed=settings.seed)
    else:
        handle = patch_model(model, heads=None, scale=True, offset=False, backend=backend)
        try:
            handle.lofit.initialize(settings.init_std, settings.seed)
            _train(handle, train_dataset, data_collator, loss, settings, output_dir, training_args)
            scores = handle.scale.detach().float().norm(dim=-1).cpu().tolist()
        finally:
            handle.remove()
        if not all(math.isfinite(score) for score in scores):
            raise ValueError("step 1 ended with non-finite scales (training diverged), so the heads cannot be "
                             "ranked; lower the learning rate")
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        ranking = HeadRanking([(*handle.heads[i], scores[i]) for i in order], handle.num_layers,
                              handle.num_heads, settings={"loss": loss, **asdict(settings)})
    os.makedirs(output_dir, exist_ok=True)
    ranking.save(os.path.join(output_dir, "ranking.json"))
    return ranking


# ----------------------------------------------------------------------------------------------
# Step 2: offset tuning
# ----------------------------------------------------------------------------------------------

def tune(model: nn.Module, train_dataset, data_collator, *, heads: Sequence = None,
         ranking: Optional[HeadRanking] = None, k=None, loss: str = "sft",
         settings: Optional[StepSettings] = None, output_dir: str = "lofit_output/tune",
         training_args: Optional[dict] = None, backend: str = "auto",
         resume_from_checkpoint=None) -> LofitHandle:
    """Step 2: learn offsets (init Normal(0, init_std), l1_lambda 0) on the top-K heads of a ranking, or on
    explicit heads. Returns the patched model's handle (`handle.save_pretrained(dir)` writes the adapter); if
    training fails, LoFiT is taken off the model again.

    Args:
        model, train_dataset, data_collator, loss, training_args, backend: as for `select_heads`.
        heads: explicit (layer, head) pairs; or
        ranking, k: the top K heads of a `HeadRanking` (K a count or a fraction of all heads; default: the
            paper's K).
        settings: learning rate, epochs, batch, seed, init_std, train_size (a seeded subset of train_dataset;
            default: the paper's for the model's shape, `paper_settings(None, model=model)`).
        output_dir: Trainer's directory; checkpoints (training_args save_strategy) hold the adapter and the
            optimizer state.
        resume_from_checkpoint: a checkpoint to continue from.
    """
    settings = settings or paper_settings(None, model=model)["tune"]
    if (heads is None) == (ranking is None):
        raise ValueError("give tune() either heads=[(layer, head), ...] or ranking= with k=")
    if ranking is not None:
        shape = attention_shape(model)
        if (ranking.num_layers, ranking.num_heads) != (shape.num_layers, shape.num_heads):
            raise ValueError(f"the ranking is for {ranking.num_layers} layers x {ranking.num_heads} heads, "
                             f"the model has {shape.num_layers} x {shape.num_heads}")
        heads = ranking.top(k if k is not None else paper_settings(None, model=model)["k"])
    train_dataset = training_subset(train_dataset, settings.train_size, settings.seed)
    handle = patch_model(model, heads=heads, scale=False, offset=True, backend=backend)
    try:
        handle.lofit.initialize(settings.init_std, settings.seed)
        handle.method_settings = {"step": "tune", "loss": loss, "localizer": ranking.localizer if ranking else None,
                                  **asdict(settings)}
        _train(handle, train_dataset, data_collator, loss, settings, output_dir, training_args,
               resume_from_checkpoint)
    except BaseException:
        handle.remove()  # the model as it was, so that a second try can patch it again
        raise
    return handle

