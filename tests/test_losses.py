"""DPO loss and sequence log-probabilities against numbers worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from lofit_fast.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs

from helpers import tiny_model


def test_dpo_loss_matches_hand_computation():
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0, -1.0])
    reference_chosen = torch.tensor([-1.5, -2.0])
    reference_rejected = torch.tensor([-2.5, -1.5])
    loss = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    # Row 0: policy margin -1 - (-3) = 2, reference margin -1.5 - (-2.5) = 1, beta * (2 - 1) = 0.5,
    #        -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    # Row 1: policy margin -2 - (-1) = -1, reference margin -2 - (-1.5) = -0.5, beta * (-1 + 0.5) = -0.25,
    #        -log sigmoid(-0.25) = log(1 + e^0.25) = 0.825939
    # Mean: (0.474077 + 0.825939) / 2 = 0.650008
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.25))) / 2
    assert expected == pytest.approx(0.650008, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # d loss / d policy_chosen[i] = -beta * sigmoid(-beta * margin_i) / batch
    loss.backward()
    expected_grad = [-0.5 * (1 / (1 + math.exp(0.5))) / 2, -0.5 * (1 / (1 + math.exp(-0.25))) / 2]
    assert policy_chosen.grad.tolist() == pytest.approx(expected_grad, abs=1e-6)


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    logps = torch.tensor([-4.0, -7.0, -1.0])
    loss = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_loss_takes_a_reference_of_another_dtype():
    """The reference log-probabilities are stored in fp32 (or come back as fp64); the loss follows the policy."""
    policy = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    loss = dpo_loss(policy, policy - 2, torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -3.0]), beta=1.0)
    # margin (2 - 1) = 1 for both rows: -log sigmoid(1) = log(1 + e^-1)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_dpo_loss_rejects_a_beta_that_is_not_positive(beta):
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(logps, logps, logps, logps, beta=beta)


def test_sequence_logprobs_hand_computed():
    # Uniform logits over 4 tokens: every token has log-probability log(1/4).
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1]])  # two scored tokens (position 0 is never predicted)
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx([2 * math.log(0.25)], abs=1e-6)
    # Logits [log 1, log 3] over 2 tokens at position 0: p(token 1) = 3/4; position 1 uniform: p = 1/2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(0.75) + math.log(0.5), abs=1e-6)


def test_sequence_logprobs_matches_an_explicit_loop_with_masking():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    labels[0, :3] = IGNORE_INDEX  # a masked prompt
    labels[1, 4:] = IGNORE_INDEX  # right padding
    labels[2, :] = IGNORE_INDEX   # nothing scored
    expected = []
    for row in range(3):
        total = 0.0
        for position in range(1, 6):  # token t is predicted from the logits at t - 1
            if labels[row, position] != IGNORE_INDEX:
                total += torch.log_softmax(logits[row, position - 1], dim=-1)[labels[row, position]].item()
        expected.append(total)
    result = sequence_logprobs(logits, labels)
    assert result.dtype == torch.float32 and result.shape == (3,)
    assert result.tolist() == pytest.approx(expected, abs=1e-5)
    assert expected[2] == 0.0


def test_sequence_logprobs_of_bf16_logits_is_fp32():
    logits = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    labels = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(2))
    result = sequence_logprobs(logits, labels)
    assert result.dtype == torch.float32
    assert result.tolist() == pytest.approx(sequence_logprobs(logits.float(), labels).tolist(), abs=1e-5)


def test_sequence_logprobs_agrees_with_the_models_own_loss():
    """-sum of the scored log-probabilities / number of scored tokens is the causal LM's mean loss."""
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        output = model(input_ids=ids, labels=labels)
    scored = (labels[:, 1:] != IGNORE_INDEX).sum()
    assert (-sequence_logprobs(output.logits, labels).sum() / scored).item() == pytest.approx(output.loss.item(),
                                                                                             abs=1e-5)
    # and an independent F.cross_entropy over the shifted tokens
    reference = F.cross_entropy(output.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    assert -sequence_logprobs(output.logits, labels).sum().item() == pytest.approx(reference.item(), abs=1e-4)


def test_sequence_logprobs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        sequence_logprobs(torch.zeros(2, 5, 4), torch.zeros(2, 4, dtype=torch.long))
