"""Losses of the two LoFiT steps that the model's own forward does not give: DPO on preference pairs.

SFT needs nothing here: the collator masks prompt tokens to -100 and the causal LM's loss is the
answer tokens' cross-entropy.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(label_t | tokens < t), skipping positions labelled -100.

    logits: (batch, seq, vocab), labels: (batch, seq) aligned with the input ids (the shift by one that
    causal LMs need happens here). Computed in fp32 so bf16 logits do not lose the small differences
    DPO compares. Returns (batch,) fp32.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Mean DPO loss (Rafailov et al. 2023): -log sigmoid(beta * (policy margin - reference margin)).

    Each argument is (batch,) sequence log-probabilities; the reference is the base model with LoFiT off.
    """
    if beta <= 0:
        raise ValueError(f"dpo beta must be positive, got {beta}")
    reference_chosen = reference_chosen.to(policy_chosen.device, policy_chosen.dtype)
    reference_rejected = reference_rejected.to(policy_chosen.device, policy_chosen.dtype)
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()
