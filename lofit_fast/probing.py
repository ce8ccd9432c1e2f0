"""The probing localizer: rank heads by how well a linear probe on each head's activation tells a
prompt's correct answer from a wrong one (inference-time intervention, Li et al. 2023; the LoFiT
paper's "probing" baseline).

    ranking = probe_ranking(model, rows, collator)   # a HeadRanking, localizer "probe"

1. Contrast pairs: each pair is one prompt with a correct answer (positive) and a wrong one
   (negative). Preference rows give both (chosen / rejected). For SFT rows the negative is the
   prompt joined with the answer of another example whose answer differs.
2. Activations: the input z of every layer's o_proj, per head, at the last non-padded token of each
   sequence (ITI probes the last token of question + answer).
3. Probes: one logistic regression per head, all trained at once; the pairs are split into train and
   validation, and each head is scored by its probe's validation accuracy.
Nothing is trained in the model; it is left as it was.
"""

import random

import torch
from torch import nn

from .losses import IGNORE_INDEX
from .patch import attention_shape, find_o_projs
from .ranking import HeadRanking

# Fewer pairs than this leave too few for both a train and a validation split to mean anything.
MIN_PAIRS = 8


# ----------------------------------------------------------------------------------------------
# Contrast pairs
# ----------------------------------------------------------------------------------------------

def _row_format(rows: list) -> str:
    """The rows' kind: "dpo" for preference rows (chosen_* / rejected_*), "sft" for input_ids + labels."""
    if not rows:
        raise ValueError("the probing localizer got an empty dataset; it needs at least "
                         f"{MIN_PAIRS} examples")
    keys = set(rows[0])
    if {"chosen_input_ids", "rejected_input_ids"} <= keys:
        return "dpo"
    if {"input_ids", "labels"} <= keys:
        return "sft"
    raise ValueError(f"the probing localizer needs SFT rows (input_ids, labels with the prompt masked to "
                     f"{IGNORE_INDEX}) or preference rows (chosen_input_ids, rejected_input_ids, ...); "
                     f"the first row has keys {sorted(keys)}")


def _prompt_and_answer(row: dict, index: int) -> tuple:
    """(prompt ids, answer ids, answer labels) of an SFT row: the answer starts at the first label that is
    not IGNORE_INDEX. Padding (attention_mask 0) is dropped first."""
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(row["labels"], dtype=torch.long)
    if "attention_mask" in row:
        keep = torch.as_tensor(row["attention_mask"]).bool()
        ids, labels = ids[keep], labels[keep]
    answer_positions = (labels != IGNORE_INDEX).nonzero()
    if len(answer_positions) == 0:
        raise ValueError(f"row {index} has no answer tokens (all its labels are {IGNORE_INDEX}); the probing "
                         f"localizer needs an answer after each prompt")
    start = int(answer_positions[0])
    return ids[:start], ids[start:], labels[start:]


def _sft_row(prompt: torch.Tensor, answer: torch.Tensor, answer_labels: torch.Tensor) -> dict:
    return {"input_ids": torch.cat([prompt, answer]),
            "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer_labels])}


def sft_contrast_pairs(rows: list, rng: random.Random) -> list:
    """[(positive row, negative row), ...]: row i's prompt with its own answer, and with the answer of a
    uniformly drawn example whose answer (as tokens) differs. Examples whose answer every other example
    shares have no negative and are left out. Positives are rebuilt the same way as negatives, so the two
    differ only in the answer."""
    parts = [_prompt_and_answer(row, index) for index, row in enumerate(rows)]
    answers = [tuple(answer.tolist()) for _, answer, _ in parts]
    # Indices grouped by answer, each group contiguous in `by_answer`: an example with a different answer
    # is then the k-th index outside one contiguous range, drawn in O(1).
    by_answer = sorted(range(len(rows)), key=lambda i: (answers[i], i))
    group_start, group_size = {}, {}
    for position, i in enumerate(by_answer):
        group_start.setdefault(answers[i], position)
        group_size[answers[i]] = group_size.get(answers[i], 0) + 1
    pairs = []
    for i, (prompt, answer, answer_labels) in enumerate(parts):
        start, size = group_start[answers[i]], group_size[answers[i]]
        if size == len(rows):
            continue
        k = rng.randrange(len(rows) - size)
        j = by_answer[k if k < start else k + size]
        pairs.append((_sft_row(prompt, answer, answer_labels), _sft_row(prompt, parts[j][1], parts[j][2])))
    return pairs


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------

def _batches(pairs: list, row_format: str, data_collator, batch_size: int):
    """(input_ids, attention_mask) batches: every positive first, then every negative, in pair order."""
    for side in (0, 1):  # positive, negative
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            if row_format == "dpo":
                prefix, batch = ("chosen_", "rejected_")[side], data_collator(chunk)
            else:
                prefix, batch = "", data_collator([pair[side] for pair in chunk])
            input_ids = batch[f"{prefix}input_ids"]
            yield input_ids, batch.get(f"{prefix}attention_mask", torch.ones_like(input_ids))


@torch.no_grad()
def head_activations(model: nn.Module, batches, num_sequences: int) -> torch.Tensor:
    """o_proj's input z of every layer, split into heads, at the last non-padded token of each sequence:
    an fp32 CPU tensor (num_sequences, layers, heads, head_dim), rows in the order of `batches`
    ((input_ids, attention_mask) pairs; left or right padding).

    Forward pre-hooks record z in eval mode; afterwards the hooks are removed and the train/eval mode put
    back. The tensor takes num_sequences * layers * heads * head_dim * 4 bytes: 512 KiB per sequence for
    Llama 2-7B (32 x 32 x 128), 800 KiB for 13B.
    """
    shape = attention_shape(model)
    activations = torch.empty(num_sequences, shape.num_layers, shape.num_heads, shape.head_dim)
    rows, last_token = slice(0, 0), None  # the batch's place in `activations` and its last tokens, set per batch

    def record(layer: int):
        def hook(module, args):
            z = args[0]
            picked = z[torch.arange(z.shape[0], device=z.device), last_token.to(z.device)]
            activations[rows, layer] = picked.float().cpu().view(-1, shape.num_heads, shape.head_dim)

        return hook

    hooks = [o_proj.register_forward_pre_hook(record(layer)) for layer, o_proj in enumerate(find_o_projs(model))]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        start = 0
        for input_ids, attention_mask in batches:
            rows = slice(start, start + len(input_ids))
            # The last position holding a token, whichever side the padding is on.
            last_token = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            start = rows.stop
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if start != num_sequences:
        raise RuntimeError(f"the batches held {start} sequences, expected {num_sequences}")
    return activations


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------

def fit_probes(features: torch.Tensor, labels: torch.Tensor, *, steps: int = 100, learning_rate: float = 0.05,
               l2: float = 1e-2) -> tuple:
    """One logistic regression per probe, all trained at once: features (P, N, D) (probes, examples,
    features; standardised), labels (N,) in {0, 1}. Returns (weight (P, D), bias (P,)).

    Full-batch Adam from zero for a fixed number of steps on mean cross-entropy + l2 * |w|^2, summed over
    probes. Adam works elementwise and the probes share no parameter, so each probe trains exactly as it
    would alone. Deterministic: no randomness is involved.
    """
    num_probes, _, dim = features.shape
    weight = torch.zeros(num_probes, dim, requires_grad=True)
    bias = torch.zeros(num_probes, requires_grad=True)
    targets = labels.float().expand(num_probes, -1)
    optimizer = torch.optim.Adam([weight, bias], lr=learning_rate)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = torch.einsum("pnd,pd->pn", features, weight) + bias[:, None]
            loss = (nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum()
                    + l2 * weight.square().sum())
            loss.backward()
            optimizer.step()
    return weight.detach(), bias.detach()


def evaluate_probes(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple:
    """(accuracy (P,), mean log-likelihood of the true label (P,)) of each probe on (P, N, D) features."""
    logits = torch.einsum("pnd,pd->pn", features, weight) + bias[:, None]
    targets = labels.float().expand_as(logits)
    accuracy = ((logits > 0).float() == targets).float().mean(1)
    log_likelihood = -nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    return accuracy, log_likelihood


def probe_ranking(model: nn.Module, train_dataset, data_collator, *, batch_size: int = 8,
                  validation_fraction: float = 0.2, seed: int = 0, steps: int = 100, learning_rate: float = 0.05,
                  l2: float = 1e-2) -> HeadRanking:
    """Rank every head by the validation accuracy of a linear probe on its activation (ITI-style).

    Args:
        model: the base model (nothing is trained in it).
        train_dataset: SFT rows (input_ids, labels with the prompt masked to -100, as `data.tokenize_sft`
            makes) or preference rows (chosen_* / rejected_*, as `data.tokenize_preference` makes), batched by
            `data_collator`. Preference rows give the pairs directly; for SFT rows each prompt's negative takes
            the answer of another example whose answer differs (drawn with `seed`; examples whose answer all
            others share are left out). At least MIN_PAIRS pairs are needed.
        batch_size: sequences per forward pass when reading activations.
        validation_fraction, seed: the pairs (not sequences: a prompt's two sides stay together) are split with
            `seed`, this fraction held out.
        steps, learning_rate, l2: each head's probe, fitted by `fit_probes` on features standardised with the
            train split's mean and std.

    Score: validation accuracy; ties (likely with few validation pairs) go to the higher validation
    log-likelihood, then to the lower (layer, head). Settings record the probe's settings and pair counts.
    Memory: the activations of 2 x pairs sequences are kept on the CPU in fp32, 512 KiB per sequence for
    Llama 2-7B (1,000 pairs: 1 GiB), twice that for a moment while they are rearranged for the probes.
    Time: one forward pass per sequence, then `steps` full-batch passes over the train activations on
    the CPU.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction!r}: give a fraction in (0, 1)")
    rows = [dict(row) for row in train_dataset]
    row_format = _row_format(rows)
    rng = random.Random(seed)
    pairs = rows if row_format == "dpo" else sft_contrast_pairs(rows, rng)
    if len(pairs) < MIN_PAIRS:
        left_out = len(rows) - len(pairs)
        why = (f" ({left_out} of {len(rows)} examples left out: no other example has a different answer)"
               if left_out else "")
        raise ValueError(f"the probing localizer needs at least {MIN_PAIRS} correct/wrong answer pairs, "
                         f"got {len(pairs)}{why}")
    num_pairs = len(pairs)
    activations = head_activations(model, _batches(pairs, row_format, data_collator, batch_size), 2 * num_pairs)
    shape = attention_shape(model)

    # Pairs, not sequences, are split: a prompt's positive and negative stay on one side.
    shuffled = list(range(num_pairs))
    rng.shuffle(shuffled)
    num_validation = min(num_pairs - 1, max(1, round(validation_fraction * num_pairs)))
    train_pairs, validation_pairs = torch.tensor(shuffled[num_validation:]), torch.tensor(shuffled[:num_validation])
    num_train = 2 * len(train_pairs)
    # Sequences reordered to train positives, train negatives, validation positives, validation negatives
    # (activations hold every positive, then every negative), heads first: the probes' batched products
    # then read contiguous (sequences, head_dim) blocks, and the splits are views.
    sequences = torch.cat([train_pairs, train_pairs + num_pairs, validation_pairs, validation_pairs + num_pairs])
    features = activations.flatten(1, 2).transpose(0, 1)[:, sequences].contiguous()
    del activations  # `features` is a copy of the same size
    labels = torch.tensor([1.0] * len(train_pairs) + [0.0] * len(train_pairs)
                          + [1.0] * num_validation + [0.0] * num_validation)
    std, mean = torch.std_mean(features[:, :num_train], dim=1, keepdim=True)
    features.sub_(mean).div_(std.clamp_min(1e-6))  # a constant feature would divide by zero
    weight, bias = fit_probes(features[:, :num_train], labels[:num_train], steps=steps,
                              learning_rate=learning_rate, l2=l2)
    accuracy, log_likelihood = evaluate_probes(features[:, num_train:], labels[num_train:], weight, bias)

    heads = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    accuracy, log_likelihood = accuracy.tolist(), log_likelihood.tolist()
    ranked = sorted(range(len(heads)), key=lambda i: (-accuracy[i], -log_likelihood[i], heads[i]))
    settings = {"format": row_format, "pairs": num_pairs, "validation_pairs": num_validation,
                "batch_size": batch_size, "validation_fraction": validation_fraction, "seed": seed, "steps": steps,
                "learning_rate": learning_rate, "l2": l2,
                "score": "validation accuracy (ties: validation log-likelihood)"}
    return HeadRanking([(*heads[i], accuracy[i]) for i in ranked], shape.num_layers, shape.num_heads,
                       localizer="probe", settings=settings)
