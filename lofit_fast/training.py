"""The two LoFiT steps, trained with `transformers.Trainer`.

Step 1, `select_heads`: learn a scale on every head with an L1 penalty, rank heads by ||A_lh||_2
(or, as the paper's baselines, a random order or linear probes' accuracy: `probing.probe_ranking`).
Step 2, `tune`: from the frozen base, learn offsets on the top-K heads of a ranking.

Both losses come in two flavours: "sft" (the model's own loss on labels, prompt tokens masked to
-100 by the collator) and "dpo" (pairs scored against the base model with LoFiT switched off, its
log-probabilities computed once before training). Logging, progress bars, gradient accumulation,
mixed precision, checkpoints and resume all come from Trainer; the base stays frozen, so the
optimizer only ever sees LoFiT's parameters.
"""

import contextlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .io import atomic_write_text
from .losses import dpo_loss, sequence_logprobs
from .patch import LofitHandle, attention_shape, patch_model
from .quantization import prepare_kbit_training

LOSSES = ("sft", "dpo")
LOCALIZERS = ("lofit", "random", "probe")


@dataclass
class StepSettings:
    """Settings of one LoFiT step. Defaults are the paper's (Llama 2-7B, see PAPER_SETTINGS)."""

    learning_rate: float = 5e-3
    l1_lambda: float = 0.0
    num_train_epochs: float = 5.0
    per_device_train_batch_size: int = 8
    init_std: float = 1e-3
    dpo_beta: float = 0.5
    seed: int = 42


# The reference scripts' settings (Llama 2-7B, 5 epochs, batch 8); see the method notes.
PAPER_SETTINGS = {
    "truthfulqa": {"select": StepSettings(learning_rate=5e-3, l1_lambda=5e-4), "k": 32,
                   "tune": StepSettings(learning_rate=1e-2)},
    "mquake": {"select": StepSettings(learning_rate=5e-3, l1_lambda=1e-3), "k": 32,
               "tune": StepSettings(learning_rate=1e-2)},
    "clutrr": {"select": StepSettings(learning_rate=5e-4, l1_lambda=5e-3), "k": 32,
               "tune": StepSettings(learning_rate=1e-2)},
}
# Tasks without a paper setting (generic JSON lines) start from the TruthfulQA/MQuAKE middle ground.
DEFAULT_SETTINGS = {"select": StepSettings(learning_rate=5e-3, l1_lambda=1e-3), "k": 32,
                    "tune": StepSettings(learning_rate=1e-2)}


def paper_settings(task: Optional[str]) -> dict:
    """{"select": StepSettings, "k": int, "tune": StepSettings} for a task name (copies, safe to edit)."""
    chosen = PAPER_SETTINGS.get(task, DEFAULT_SETTINGS)
    return {"select": StepSettings(**asdict(chosen["select"])), "k": chosen["k"],
            "tune": StepSettings(**asdict(chosen["tune"]))}


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class LofitTrainer(Trainer):
    """Trainer with LoFiT's losses: SFT or DPO, plus `l1_lambda * sum|A|` on the scales."""

    def __init__(self, *args, handle: LofitHandle, loss: str, l1_lambda: float = 0.0, dpo_beta: float = 0.5,
                 **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
        self.handle, self.loss_kind, self.l1_lambda, self.dpo_beta = handle, loss, l1_lambda, dpo_beta
        with _allow_quantized_training(kwargs.get("model") or args[0]):
            super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_kind == "sft":
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            labels=inputs["labels"])
            loss = outputs.loss
        else:
            chosen = _pair_logprobs(model, inputs, "chosen")
            rejected = _pair_logprobs(model, inputs, "rejected")
            loss = dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                            beta=self.dpo_beta)
            outputs = None
        if self.l1_lambda and self.handle.scale is not None:
            loss = loss + self.l1_lambda * self.handle.scale.abs().sum()
        return (loss, outputs) if return_outputs else loss


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


def _training_arguments(output_dir: str, settings: StepSettings, overrides: Optional[dict]) -> TrainingArguments:
    arguments = dict(
        output_dir=output_dir,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        seed=settings.seed,
        weight_decay=0.0,
        lr_scheduler_type="constant",
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
    arguments = _training_arguments(output_dir, settings, training_args)
    _prepare_for_training(handle.model, arguments)  # before the DPO reference pass (see the function)
    if loss == "dpo":
        train_dataset = with_reference_logprobs(handle, train_dataset, data_collator,
                                                settings.per_device_train_batch_size)
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
    if trainer.args.disable_tqdm and trainer.args.logging_strategy == "no":
        # Asked to be quiet: without this, PrinterCallback still prints the end-of-training summary.
        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


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
    Returns the examples with `ref_chosen_logps` / `ref_rejected_logps` added."""
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

@dataclass
class HeadRanking:
    """Every head of the model, most important first: `ranking[i] = (layer, head, score)`."""

    ranking: list
    num_layers: int
    num_heads: int
    localizer: str = "lofit"
    settings: dict = field(default_factory=dict)

    def top(self, k) -> list:
        """The first K (layer, head) pairs; K is a count, or a fraction (0, 1) of all heads."""
        return [(layer, head) for layer, head, _ in self.ranking[:resolve_k(k, len(self.ranking))]]

    def save(self, path) -> None:
        text = json.dumps({"localizer": self.localizer, "num_layers": self.num_layers,
                           "num_heads": self.num_heads, "settings": self.settings,
                           "ranking": [[layer, head, score] for layer, head, score in self.ranking]}, indent=1)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path) -> "HeadRanking":
        try:
            with open(path) as file:
                data = json.load(file)
            ranking = [(int(layer), int(head), None if score is None else float(score))
                       for layer, head, score in data["ranking"]]
            return cls(ranking=ranking, num_layers=int(data["num_layers"]), num_heads=int(data["num_heads"]),
                       localizer=data.get("localizer", "lofit"), settings=data.get("settings", {}))
        except FileNotFoundError:
            raise FileNotFoundError(f"no head ranking at {path}; run `lofit select` (or select_heads) first") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a valid head ranking ({type(error).__name__}: {error}); "
                             f"expected JSON with num_layers, num_heads and ranking [[layer, head, score], ...]") from None


def resolve_k(k, total_heads: int) -> int:
    """K as a count (int >= 1) or as a fraction of all heads (float in (0, 1))."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a head count or a fraction of all heads, not {k!r}")
    if isinstance(k, float) and 0 < k < 1:
        return max(1, round(k * total_heads))
    if k != int(k) or not 1 <= k <= total_heads:
        raise ValueError(f"k={k!r}: give a count between 1 and {total_heads} or a fraction in (0, 1)")
    return int(k)


def random_ranking(model: nn.Module, seed: int = 0) -> HeadRanking:
    """The paper's random-heads baseline: every head in a seeded random order, with no score."""
    shape = attention_shape(model)
    heads = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    random.Random(seed).shuffle(heads)
    return HeadRanking([(layer, head, None) for layer, head in heads], shape.num_layers, shape.num_heads,
                       localizer="random", settings={"seed": seed})


def select_heads(model: nn.Module, train_dataset, data_collator, *, loss: str = "sft",
                 settings: Optional[StepSettings] = None, localizer: str = "lofit",
                 output_dir: str = "lofit_output/select", training_args: Optional[dict] = None,
                 backend: str = "auto") -> HeadRanking:
    """Step 1: rank every attention head of `model` for the task; saves `output_dir/ranking.json`.

    localizer "lofit" trains a scale on every head (init Normal(0, init_std)) with loss
    task + l1_lambda * sum|A| and scores each head by ||A_lh||_2; "random" is the seeded baseline;
    "probe" scores each head by a linear probe's validation accuracy (`probing.probe_ranking`, with
    settings.per_device_train_batch_size as its batch size and settings.seed; nothing is trained in the model).
    The model is left as it was (LoFiT removed, flags restored).
    """
    if localizer not in LOCALIZERS:
        raise ValueError(f"localizer={localizer!r} is not one of {LOCALIZERS}")
    settings = settings or paper_settings(None)["select"]
    if localizer == "random":
        ranking = random_ranking(model, settings.seed)
    elif localizer == "probe":
        from .probing import probe_ranking  # imported here: probing imports HeadRanking from this module

        ranking = probe_ranking(model, train_dataset, data_collator,
                                batch_size=settings.per_device_train_batch_size, seed=settings.seed)
    else:
        handle = patch_model(model, heads=None, scale=True, offset=False, backend=backend)
        try:
            torch.manual_seed(settings.seed)
            with torch.no_grad():
                handle.scale.normal_(0.0, settings.init_std)
            _train(handle, train_dataset, data_collator, loss, settings, output_dir, training_args)
            scores = handle.scale.detach().float().norm(dim=-1).cpu().tolist()
        finally:
            handle.remove()
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
    """Step 2: learn offsets (init Normal(0, init_std), l1_lambda 0) on the top-K heads of `ranking`
    (K a count or a fraction of all heads), or on explicit `heads`. Returns the patched model's handle;
    `handle.save_pretrained(dir)` writes the adapter."""
    settings = settings or paper_settings(None)["tune"]
    if (heads is None) == (ranking is None):
        raise ValueError("give tune() either heads=[(layer, head), ...] or ranking= with k=")
    if ranking is not None:
        shape = attention_shape(model)
        if (ranking.num_layers, ranking.num_heads) != (shape.num_layers, shape.num_heads):
            raise ValueError(f"the ranking is for {ranking.num_layers} layers x {ranking.num_heads} heads, "
                             f"the model has {shape.num_layers} x {shape.num_heads}")
        heads = ranking.top(k if k is not None else paper_settings(None)["k"])
    handle = patch_model(model, heads=heads, scale=False, offset=True, backend=backend)
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        handle.offset.normal_(0.0, settings.init_std)
    handle.method_settings = {"step": "tune", "loss": loss, "localizer": ranking.localizer if ranking else None,
                              **asdict(settings)}
    _train(handle, train_dataset, data_collator, loss, settings, output_dir, training_args,
           resume_from_checkpoint)
    return handle

