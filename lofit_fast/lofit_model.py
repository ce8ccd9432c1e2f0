"""The PEFT-shaped API: `LofitConfig`, `get_lofit_model`, `LofitModel`.

    config = LofitConfig(k=16, ranking="lofit_output/select/ranking.json")   # or heads=[(layer, head), ...]
    model = get_lofit_model(base_model, config)
    model.print_trainable_parameters()
    ... train `model` with transformers.Trainer, TRL, or a loop of your own ...
    model.save_pretrained("adapter")
    model = LofitModel.from_pretrained(base_model, "adapter")
    with model.disable_adapter():
        base_logits = model(input_ids).logits
    merged = model.merge_and_unload()

The names are PEFT's, so code written for a PeftModel reads the same; everything underneath is the core
API (`patch_model`, `LofitHandle`, `save_adapter` / `load_adapter`, `merge_and_unload`): `LofitModel` is a
thin wrapper that keeps the patched model and its handle, and forwards every other attribute to the model.
"""

import contextlib
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

from torch import nn

from .adapter import AdapterConfig, attach_adapter, read_adapter
from .patch import LofitHandle, base_transformer, patch_model
from .ranking import LOCALIZERS, HeadRanking, random_ranking

# Keys of LofitConfig saved in adapter_config.json's "method" block.
CONFIG_KEY = "lofit_config"


@dataclass
class LofitConfig:
    """Which heads LoFiT adapts, which vectors it learns and how they start.

    Args:
        heads: explicit (layer, head) pairs; or
        k: the top K heads (a count, or a fraction of all heads) of a head ranking, which comes from
            `ranking` (the path of a ranking.json written by `lofit_fast.select_heads` / `lofit select`), from
            the `ranking=` argument of `get_lofit_model`, or, with localizer="random", from a seeded shuffle.
            With neither `heads` nor `k`: every head of every layer (what step 1 trains).
        localizer: where the ranking came from: "lofit" (step 1's scales), "probe" (linear probes) or "random".
        ranking: the path of a ranking.json (see k).
        scale, offset: the vectors to learn. The defaults (offsets only) are step 2 of the method.
        init_std: both start as Normal(0, init_std) draws (0: exactly the base model), seeded by `seed`.
        target_module: the dotted path from a decoder layer to the module whose input LoFiT transforms; None
            for the architecture's attention output projection.
        seed: seeds the initial draws (and, with localizer="random", the heads).
        backend: "auto", "torch" or "triton" (see `lofit_fast.ops.head_affine`).
    """

    heads: Optional[list] = None
    k: Optional[Union[int, float]] = None
    localizer: str = "lofit"
    ranking: Optional[str] = None
    scale: bool = False
    offset: bool = True
    init_std: float = 1e-3
    target_module: Optional[str] = None
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):
        if self.heads is not None and self.k is not None:
            raise ValueError("LofitConfig takes heads=[(layer, head), ...] or k= (with a ranking), not both")
        if self.heads is not None:
            self.heads = [tuple(item) for item in self.heads]
        if self.localizer not in LOCALIZERS:
            raise ValueError(f"localizer={self.localizer!r} is not one of {LOCALIZERS}")
        if self.ranking is not None:
            self.ranking = os.fspath(self.ranking)
        if not (self.scale or self.offset):
            raise ValueError("scale and offset are both off; LoFiT needs at least one of them")
        if (isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float))
                or not math.isfinite(self.init_std) or self.init_std < 0):
            raise ValueError(f"init_std must be a finite number >= 0, not {self.init_std!r}")

    def to_dict(self) -> dict:
        """JSON values only (heads as lists), as saved in adapter_config.json."""
        values = asdict(self)
        if values["heads"] is not None:
            values["heads"] = [list(item) for item in values["heads"]]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "LofitConfig":
        """The config from `to_dict`'s output; unknown keys (from newer versions) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})


def _resolve_heads(model: nn.Module, config: LofitConfig, ranking) -> tuple[Optional[list], Optional[str]]:
    """(heads for patch_model, the localizer that chose them or None)."""
    if config.heads is not None:
        if ranking is not None:
            raise ValueError("config.heads lists the heads already; drop the ranking= argument or config.heads")
        return config.heads, None
    if config.k is None:
        if ranking is not None or config.ranking is not None:
            raise ValueError("a ranking was given but config.k is None; set k to the number of top heads to adapt")
        return None, None
    if ranking is None and config.ranking is not None:
        ranking = HeadRanking.load(config.ranking)
    if ranking is None:
        if config.localizer != "random":
            raise ValueError(
                f"config.k={config.k!r} picks the top heads of a ranking, and none was given: run "
                f"lofit_fast.select_heads(...) (localizer {config.localizer!r}) and pass ranking=<its result> or "
                f"LofitConfig(ranking='<output_dir>/ranking.json'), list heads=[(layer, head), ...], or set "
                f"localizer='random'")
        ranking = random_ranking(base_transformer(model), config.seed)
    return ranking.top(config.k), ranking.localizer


def get_lofit_model(model: nn.Module, config: LofitConfig, ranking=None) -> "LofitModel":
    """Patch `model` in place as `config` says and return it wrapped as a `LofitModel`. The base model is
    frozen; LoFiT's parameters are the only trainable ones.

    Args:
        model: a Hugging Face causal LM (plain, bitsandbytes, or a PEFT model around one).
        config: which heads and vectors (`LofitConfig`).
        ranking: a `HeadRanking` (from `select_heads`) to take `config.k` heads from, instead of
            `config.ranking`'s file.
    """
    if not isinstance(config, LofitConfig):
        raise TypeError(f"get_lofit_model takes a LofitConfig, not {type(config).__name__}")
    heads, localizer = _resolve_heads(model, config, ranking)
    handle = patch_model(model, heads=heads, scale=config.scale, offset=config.offset, backend=config.backend,
                         target_module=config.target_module)
    handle.lofit.initialize(config.init_std, config.seed)
    handle.method_settings = {CONFIG_KEY: config.to_dict(), "localizer": localizer}
    return LofitModel(handle, config)


def _saved_lofit_config(adapter: AdapterConfig, backend: str) -> LofitConfig:
    """The LofitConfig of a saved adapter: the one saved with it (get_lofit_model's), or, for an adapter written
    by patch_model + save_pretrained or by the CLI, one made from the files. Heads, scale, offset and
    target_module are the files' own."""
    files = dict(heads=[tuple(item) for item in adapter.heads], k=None, ranking=None, scale=adapter.scale,
                 offset=adapter.offset, target_module=adapter.target_module, backend=backend)
    saved = adapter.method.get(CONFIG_KEY)
    return LofitConfig.from_dict({**saved, **files}) if isinstance(saved, dict) else LofitConfig(**files)


class LofitModel(nn.Module):
    """A model patched with one LoFiT adapter, under PEFT's method names.

    Calls go to the patched model (`get_base_model()`, kept as `wrapped_model`); any attribute this class does
    not define (config, generation_config, device, base_model (transformers' backbone), ...) is the model's.
    `handle` is the core `LofitHandle`, `lofit_config` the `LofitConfig`.
    """

    def __init__(self, handle: LofitHandle, config: LofitConfig):
        super().__init__()
        self.wrapped_model = handle.model
        self.handle = handle
        self.lofit_config = config
        # transformers.Trainer refuses a bitsandbytes model unless trainable adapters are attached, and reads
        # this flag (PEFT's) to know; LoFiT's are.
        self._hf_peft_config_loaded = bool(getattr(handle.model, "is_quantized", False))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of this wrapper
        except AttributeError:
            if name == "wrapped_model":  # not set yet (inside __init__ or while unpickling): no recursion
                raise
            return getattr(self.wrapped_model, name)

    # Trainer keeps only the dataset columns that `forward` names, so the usual causal LM arguments are
    # spelled out; anything else passes through **kwargs.
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        named = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache)
        return self.wrapped_model(**{key: value for key, value in named.items() if value is not None}, **kwargs)

    def generate(self, *args, **kwargs):
        return self.wrapped_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The patched model itself (LoFiT's hooks stay on it)."""
        return self.wrapped_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); a 4-bit weight counts the values it holds, 2 per byte."""
        trainable = total = 0
        for parameter in self.wrapped_model.parameters():
            count = parameter.numel()
            if type(parameter).__name__ == "Params4bit":  # two 4-bit values per byte of its storage
                count *= 2 * parameter.element_size()
            total += count
            if parameter.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print `trainable params: N || all params: M || trainable%: P`, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the `with` block the model computes the base model's outputs."""
        with self.handle.disabled():
            yield

    def save_pretrained(self, save_directory, **_ignored) -> None:
        """Write the adapter (adapter_config.json, adapter_model.safetensors; atomically) to `save_directory`.
        Keyword arguments that PEFT's save_pretrained takes (safe_serialization, ...) are accepted and
        ignored: the adapter is always safetensors."""
        self.handle.save_pretrained(save_directory)

    def export_peft_lora(self, save_directory) -> None:
        """Write the adapter as a standard PEFT LoRA adapter (see `LofitHandle.export_peft_lora`)."""
        self.handle.export_peft_lora(save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, is_trainable: bool = False,
                        backend: str = "auto") -> "LofitModel":
        """Patch `model` with the adapter saved in the directory `model_id` and return the wrapper. Everything
        (the files, the saved LofitConfig, the fit to the model) is checked before the model is touched, so a
        failed load leaves it as it was.

        Args:
            model: the base model the adapter was saved for.
            model_id: the adapter's directory (`save_pretrained`'s).
            is_trainable: as in PEFT, the adapter comes back frozen unless True.
            backend: "auto", "torch" or "triton" (see `lofit_fast.ops.head_affine`).
        """
        adapter, tensors = read_adapter(model, model_id)
        config = _saved_lofit_config(adapter, backend)
        handle = attach_adapter(model, adapter, tensors, backend=backend, trainable=is_trainable)
        return cls(handle, config)

    def merge_and_unload(self, engine: str = "transformers") -> nn.Module:
        """Fold the adapter into o_proj (see `LofitHandle.merge_and_unload`; `engine`: where the merged
        model will run), remove LoFiT and return the plain model."""
        return self.handle.merge_and_unload(engine)

    def unload(self) -> nn.Module:
        """Remove LoFiT without merging and return the base model as it was."""
        return self.handle.remove()

    def __repr__(self):
        return f"LofitModel({self.handle!r})\n{self.wrapped_model!r}"
