"""The paper's settings of both LoFiT steps, by task and by model: `StepSettings`, `paper_settings`.

    settings = paper_settings("clutrr", model=model)   # {"select": StepSettings, "k": int, "tune": StepSettings, ...}
    ranking = select_heads(model, rows, collator, settings=settings["select"])

The values are the reference scripts' (fc2869/lo-fit) for Llama 2-7B, Llama 2-13B and Gemma-7B, picked by the
model's shape or by name. This module imports no Trainer, so that the command line can offer the names.
"""

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class StepSettings:
    """Settings of one LoFiT step. Defaults are the paper's (Llama 2-7B, see PAPER_SETTINGS).

    train_size: train on this many examples, drawn with `random.Random(seed)` as the paper draws its CLUTRR
        subset (`data.training_subset`); None (or 0) for all of them.
    source: which of the paper's settings these are (`paper_settings` fills it in; it is saved with the
        adapter and the ranking).
    """

    learning_rate: float = 5e-3
    l1_lambda: float = 0.0
    num_train_epochs: float = 5.0
    per_device_train_batch_size: int = 8
    init_std: float = 1e-3
    dpo_beta: float = 0.5
    seed: int = 42
    train_size: Optional[int] = None
    source: Optional[str] = None


def _paper_task(select_lr: float, l1_lambda: float, k: int, tune_lr: float, train_size: Optional[int] = None) -> dict:
    return {"select": StepSettings(learning_rate=select_lr, l1_lambda=l1_lambda, train_size=train_size), "k": k,
            "tune": StepSettings(learning_rate=tune_lr, train_size=train_size)}


# The reference scripts' settings (fc2869/lo-fit, train_script_{truthfulqa,mquake,clutrr}.sh: 5 epochs, batch 8,
# seed 42; CLUTRR trains both steps on a 300-example subset, --train_size 300).
PAPER_SETTINGS_BY_MODEL = {
    "llama-2-7b": {"truthfulqa": _paper_task(5e-3, 5e-4, 32, 1e-2), "mquake": _paper_task(5e-3, 1e-3, 32, 1e-2),
                   "clutrr": _paper_task(5e-4, 5e-3, 32, 1e-2, train_size=300)},
    "llama-2-13b": {"truthfulqa": _paper_task(1e-3, 1e-3, 48, 2e-2), "mquake": _paper_task(1e-3, 1e-3, 48, 8e-3),
                    "clutrr": _paper_task(1e-3, 1e-3, 48, 1e-2, train_size=300)},
    "gemma-7b": {"truthfulqa": _paper_task(5e-3, 5e-4, 16, 2e-2), "mquake": _paper_task(5e-3, 5e-4, 16, 8e-3),
                 "clutrr": _paper_task(5e-4, 5e-3, 16, 1e-2, train_size=300)},
}
# How each of the paper's models is recognised: (model_type, layers, query heads, key/value heads, head_dim).
PAPER_MODEL_SHAPES = {"llama-2-7b": ("llama", 32, 32, 32, 128), "llama-2-13b": ("llama", 40, 40, 40, 128),
                      "gemma-7b": ("gemma", 28, 16, 16, 256)}
PAPER_SETTINGS = PAPER_SETTINGS_BY_MODEL["llama-2-7b"]  # the names earlier versions exported
# Tasks without a paper setting (generic JSON lines) take the model's MQuAKE settings (SFT on short answers).
GENERIC_TASK_SETTINGS = "mquake"
# A name earlier versions exported (Llama 2-7B's); paper_settings picks GENERIC_TASK_SETTINGS for the model at hand.
DEFAULT_SETTINGS = PAPER_SETTINGS[GENERIC_TASK_SETTINGS]


def paper_settings(task: Optional[str], model=None, paper_model: Optional[str] = None) -> dict:
    """The paper's settings for `task` and the model: {"select": StepSettings, "k": int, "tune": StepSettings,
    "paper_model": str, "source": str} (copies, safe to edit).

    Args:
        task: "clutrr", "mquake", "truthfulqa"; any other (or None) gets the model's MQuAKE settings.
        model: a model or its config; the paper's model with the same architecture and shape (layers, query and
            key/value heads, head_dim) gives the settings: Llama 2-7B, Llama 2-13B or Gemma-7B. Any other model
            (or none) gets Llama 2-7B's.
        paper_model: "llama-2-7b", "llama-2-13b" or "gemma-7b" to choose the set instead.
    `source` says which set was used and why; it is also each StepSettings' `source`, saved with the results.
    """
    if paper_model is None:
        paper_model, why = _paper_model_of(model)
    elif paper_model in PAPER_SETTINGS_BY_MODEL:
        why = "chosen"
    else:
        raise ValueError(f"paper_model={paper_model!r}: the paper's settings are for "
                         f"{', '.join(PAPER_SETTINGS_BY_MODEL)}")
    table = PAPER_SETTINGS_BY_MODEL[paper_model]
    settings_task = task if task in table else GENERIC_TASK_SETTINGS
    if settings_task != task:
        why += f"; the paper has no settings for {task or 'this task'}: its {GENERIC_TASK_SETTINGS} settings"
    source = f"{paper_model} {settings_task} ({why})"
    chosen = table[settings_task]
    return {"select": StepSettings(**{**asdict(chosen["select"]), "source": source}), "k": chosen["k"],
            "tune": StepSettings(**{**asdict(chosen["tune"]), "source": source}),
            "paper_model": paper_model, "source": source}


def _paper_model_of(model) -> tuple[str, str]:
    """(the paper's model whose settings fit `model`, why)."""
    config = getattr(model, "config", model)
    if config is None:
        return "llama-2-7b", "no model given: Llama 2-7B's"
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = (config.model_type, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
             head_dim)
    for name, paper_shape in PAPER_MODEL_SHAPES.items():
        if shape == paper_shape:
            return name, f"the model's shape: {shape[1]} layers x {heads} heads of {head_dim}"
    return "llama-2-7b", (f"no paper settings for this model ({shape[0]}, {shape[1]} layers x {heads} heads of "
                          f"{head_dim}): Llama 2-7B's")
