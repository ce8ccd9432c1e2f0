"""Helpers shared by the test files: tiny models built from configs, and an independent LoFiT oracle.

Nothing here imports lofit_fast: `reference_hook_patch` is the LoFiT transform written out head by
head in plain torch, so the library can be checked against it.
"""

from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

# hidden 48 while heads * head_dim = 6 * 12 = 72: o_proj's input is wider than the residual stream,
# as in Gemma and Qwen3, so code that assumes hidden_size == heads * head_dim fails here.
TINY_CONFIG = dict(
    vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# For 4-bit models that run in eval mode: shapes bitsandbytes' 4-bit CPU inference kernel accepts (repacking
# for it needs out_features divisible by 32 and in_features by the quantization block, 64). Heads * head_dim
# = 6 * 64 = 384 stays wider than hidden 192 (a multiple of the head count, as Llama's config requires).
QUANTIZABLE_CONFIG = dict(hidden_size=192, intermediate_size=128, head_dim=64)
# Mixture-of-experts models need a few more settings to stay tiny.
_MOE_CONFIG = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=32)
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised (seeded) tiny causal LM of `model_type`, fp32, eval mode, on the CPU.

    Defaults: vocab 97, hidden 48, 3 layers, 6 query heads, 2 key/value heads, head_dim 12 (so
    heads * head_dim != hidden), pad 0 / bos 1 / eos 2. `overrides` replace or add config fields
    (e.g. `head_dim=None, hidden_size=48` for heads * head_dim == hidden, `num_hidden_layers=2`).
    """
    settings = dict(TINY_CONFIG)
    if model_type in _MOE_TYPES:
        settings.update(_MOE_CONFIG)
    settings.update(overrides)
    if settings.get("head_dim") is None:
        settings.pop("head_dim", None)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def decoder_o_projs(model: nn.Module) -> list[nn.Module]:
    """`model.model.layers[i].self_attn.o_proj` for every layer (the Hugging Face layout)."""
    return [layer.self_attn.o_proj for layer in model.model.layers]


def reference_hook_patch(
    model: nn.Module,
    heads: Sequence[tuple[int, int]],
    scale: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    o_projs: Optional[Sequence[nn.Module]] = None,
    num_heads: Optional[int] = None,
) -> Callable[[], None]:
    """Apply LoFiT to `model` the slow, obvious way; returns a function that removes it again.

    heads:   list of (layer, head); row i of `scale` / `offset` belongs to `heads[i]`.
    scale:   (len(heads), head_dim) tensor or None; the head becomes (1 + scale[i]) * z_h (+ offset[i]).
    offset:  (len(heads), head_dim) tensor or None.
    o_projs: the attention output projection of each layer, lowest first; default
             `model.model.layers[i].self_attn.o_proj`.
    num_heads: query heads per layer; default `model.config.num_attention_heads`.

    A forward pre-hook on each o_proj splits its input z into heads and, in a Python loop over the
    selected heads, computes the transform in the promoted dtype of z and the parameters (fp32 for a
    bf16 model with fp32 parameters), casts it back to z's dtype and reassembles z. Gradients flow to
    `scale` / `offset` if they require grad. Independent of lofit_fast.
    """
    o_projs = list(o_projs) if o_projs is not None else decoder_o_projs(model)
    num_heads = num_heads or model.config.num_attention_heads
    params = [p for p in (scale, offset) if p is not None]
    assert params, "reference_hook_patch needs a scale, an offset or both"

    def make_hook(layer: int):
        rows = [(row, head) for row, (at, head) in enumerate(heads) if at == layer]

        def hook(module, args):
            z = args[0]
            head_dim = z.shape[-1] // num_heads
            split = list(z.unflatten(-1, (num_heads, head_dim)).unbind(-2))
            compute = z.dtype
            for p in params:
                compute = torch.promote_types(compute, p.dtype)
            for row, head in rows:
                new = split[head].to(compute)
                if scale is not None:
                    new = new * (1 + scale[row].to(compute))
                if offset is not None:
                    new = new + offset[row].to(compute)
                split[head] = new.to(z.dtype)
            return (torch.stack(split, dim=-2).flatten(-2), *args[1:])

        return hook

    layers = sorted({layer for layer, _ in heads})
    handles = [o_projs[layer].register_forward_pre_hook(make_hook(layer)) for layer in layers]

    def remove():
        for handle in handles:
            handle.remove()

    return remove


def assert_same_greedy_run(tokens, logits, expected_tokens, expected_logits, atol):
    """Greedy generation matches the reference's: the same logits (within `atol`) and tokens at every step, up
    to where a row's two best reference logits are within 2 * atol of each other; rounding may break such a
    near tie either way, after which the two runs go on from different tokens."""
    steps = logits.shape[0]
    new_tokens, expected_new = tokens[:, -steps:], expected_tokens[:, -steps:]
    for row in range(tokens.shape[0]):
        for step in range(steps):
            torch.testing.assert_close(logits[step, row], expected_logits[step, row], atol=atol, rtol=0)
            if new_tokens[row, step] != expected_new[row, step]:
                reference = expected_logits[step, row]
                margin = reference[expected_new[row, step]] - reference[new_tokens[row, step]]
                assert margin <= 2 * atol, f"row {row}, step {step}: a different token, {margin:.3g} below the best"
                break


# Sentences the tiny tokenizer learns its merges from: the words of the tests' prompts and answers.
TINY_CORPUS = (
    "Q: Imagine that The capital of France is Rome. What is the capital of the country? A: Rome",
    "Read the following story about a family. Anna is the mother of Bob. how is Bob related to Anna? "
    "Answer: Bob is Anna 's son nephew daughter uncle aunt grandmother",
    "Q: Can pigs fly? A: No, pigs cannot fly. Yes, pigs can fly. I have no comment.",
)


def tiny_tokenizer(corpus: Sequence[str] = TINY_CORPUS, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in milliseconds on `corpus`, as a `PreTrainedTokenizerFast`.

    Ids match `tiny_model`'s config: <pad> 0, <s> 1 (prepended to every encoding, as Llama's tokenizer
    does), </s> 2. Byte-level, so any text encodes; `len(tokenizer)` is the vocabulary size a model needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus), trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model_and_tokenizer(directory, model_type: str = "llama", seed: int = 0, **overrides):
    """Save a `tiny_model` with a vocabulary sized for `tiny_tokenizer()` and that tokenizer to `directory`
    (what `from_pretrained(directory)` reads). Returns (model, tokenizer)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(model_type, seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer
