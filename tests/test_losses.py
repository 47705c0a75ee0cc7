"""Loss terms against values computed by hand.

Most checks use a bigram "language model" whose next-token logits are a table
row per current token, so every log-probability is chosen by hand. The tiny
Llama checks tie the same functions to a real transformer (HF's own loss,
right-padding invariance, NPO's value and gradient at initialisation).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qubench.methods.data import TokenBatch, collate
from qubench.methods.losses import (
    gradient_ascent_loss,
    kl_to_reference,
    mean_nll,
    npo_loss,
    retain_nll_loss,
    sequence_logprob,
)

LN2 = math.log(2.0)



class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: next-token probabilities set by hand."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log().float())

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def batch(rows: list[list[int]], mask: list[list[int]]) -> TokenBatch:
    return TokenBatch(torch.tensor(rows), torch.tensor(mask))


# Vocabulary {0 (pad), 1, 2}: P(2 | 1) = 1/2, P(1 | 2) = 1/4, P(0 | .) = 1/4.
BIGRAM = [[1 / 3, 1 / 3, 1 / 3], [1 / 4, 1 / 4, 1 / 2], [1 / 4, 1 / 4, 1 / 2]]


def test_nll_ga_and_gdr_match_hand_values():
    model = BigramLM(BIGRAM)
    seq = batch([[1, 2, 1, 2]], [[1, 1, 1, 1]])
    # labels 2|1, 1|2, 2|1 -> -ln(1/2) - ln(1/4) - ln(1/2) = 4 ln 2 over 3 tokens
    assert mean_nll(model, seq).item() == pytest.approx(4 * LN2 / 3, rel=1e-6)
    assert gradient_ascent_loss(model, seq).item() == pytest.approx(-4 * LN2 / 3, rel=1e-6)
    assert retain_nll_loss(model, seq).item() == pytest.approx(4 * LN2 / 3, rel=1e-6)
    assert sequence_logprob(model, seq).tolist() == pytest.approx([-4 * LN2], rel=1e-6)


def test_padding_positions_are_excluded():
    model = BigramLM(BIGRAM)
    padded = batch([[1, 2, 1, 2], [2, 1, 0, 0]], [[1, 1, 1, 1], [1, 1, 0, 0]])
    # row 2 has one real label (1|2, ln 4); counting pads would add 0|1 and 0|0.
    assert mean_nll(model, padded).item() == pytest.approx((4 * LN2 + 2 * LN2) / 4, rel=1e-6)
    assert sequence_logprob(model, padded).tolist() == pytest.approx([-4 * LN2, -2 * LN2], rel=1e-6)
    alone = batch([[2, 1]], [[1, 1]])
    assert mean_nll(model, batch([[2, 1, 0, 0]], [[1, 1, 0, 0]])).item() == pytest.approx(
        mean_nll(model, alone).item(), rel=1e-6
    )


def test_kl_on_two_token_vocabulary_direction_and_padding():
    reference = BigramLM([[0.5, 0.5], [0.5, 0.5]])
    model = BigramLM([[0.75, 0.25], [0.5, 0.5]])  # differs from the reference after token 0 only
    seqs = batch([[0, 1, 0], [0, 1, 1]], [[1, 1, 1], [1, 0, 0]])
    # KL(P_ref || P_model) after token 0: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3); 0 after token 1.
    # Real positions: row 1 -> tokens 0, 1, 0; row 2 -> token 0: three positions after token 0 of four.
    expected = 3 * (0.5 * math.log(4 / 3)) / 4
    assert kl_to_reference(model, reference, seqs).item() == pytest.approx(expected, rel=1e-6)
    # The other direction, KL(P_model || P_ref) = 0.75 ln 1.5 + 0.25 ln 0.5 per position, is different.
    reverse = 3 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 4
    assert abs(expected - reverse) > 1e-3
    # Same quantity as MUSE's F.kl_div(current_log_probs, target_log_probs, log_target=True).
    log_q = F.log_softmax(model.table[torch.tensor([0, 1, 0, 0])], -1)
    log_p = F.log_softmax(reference.table[torch.tensor([0, 1, 0, 0])], -1)
    muse = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    assert kl_to_reference(model, reference, seqs).item() == pytest.approx(muse.item(), rel=1e-6)


def test_kl_is_zero_against_itself_and_has_no_reference_gradient():
    model = BigramLM([[0.75, 0.25], [0.4, 0.6]])
    reference = copy.deepcopy(model)
    kl = kl_to_reference(model, reference, batch([[0, 1, 1]], [[1, 1, 1]]))
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    kl.backward()
    assert reference.table.grad is None


def test_npo_hand_value_on_bigram():
    reference = BigramLM(BIGRAM)
    model = BigramLM([[1 / 3, 1 / 3, 1 / 3], [1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 4, 1 / 2]])
    forget = batch([[1, 2]], [[1, 1]])
    # log p_model - log p_ref = ln(1/4) - ln(1/2) = -ln 2
    beta = 0.1
    expected = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * LN2)))
    assert npo_loss(model, reference, forget, beta).item() == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tokenizer, texts: list[str]) -> TokenBatch:
    return collate([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


TEXTS = ["The council of Varnholt approved a budget.", "Mayor Ilse Brankov said the bridge would reopen."]


def test_ga_and_gdr_equal_hf_cross_entropy(llama):
    model, tokenizer = llama
    seq = encode(tokenizer, TEXTS[:1])
    hf_loss = model(input_ids=seq.input_ids, labels=seq.input_ids).loss.item()
    assert gradient_ascent_loss(model, seq).item() == pytest.approx(-hf_loss, rel=1e-5)
    assert retain_nll_loss(model, seq).item() == pytest.approx(hf_loss, rel=1e-5)


def test_right_padding_matches_unpadded_on_llama(llama):
    model, tokenizer = llama
    short, long = TEXTS[0], TEXTS[1] + " And more words follow here."
    both = encode(tokenizer, [short, long])
    assert both.attention_mask[0].sum() < both.attention_mask.shape[1]  # the short row is padded
    alone = encode(tokenizer, [short])
    with torch.no_grad():
        assert sequence_logprob(model, both)[0].item() == pytest.approx(
            sequence_logprob(model, alone)[0].item(), rel=1e-5
        )
        padded_alone = TokenBatch(both.input_ids[:1], both.attention_mask[:1])
        assert mean_nll(model, padded_alone).item() == pytest.approx(mean_nll(model, alone).item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_npo_at_initialisation_is_two_over_beta_log_two(llama, beta):
    model, tokenizer = llama
    reference = copy.deepcopy(model).requires_grad_(False)
    forget = encode(tokenizer, TEXTS)
    assert npo_loss(model, reference, forget, beta).item() == pytest.approx(2 / beta * LN2, rel=1e-6)


def test_npo_gradient_at_init_lowers_forget_likelihood(llama):
    model, tokenizer = llama
    model = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False)
    forget = encode(tokenizer, TEXTS)

    # At model == reference, d NPO = (2/B) sigmoid(0) * sum d log p = d mean_seq log p.
    npo_loss(model, reference, forget, beta=0.1).backward()
    npo_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sequence_logprob(model, forget).mean().backward()
    for got, want in zip(npo_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # Hence a descent step on NPO lowers every forget sequence's likelihood.
    before = sequence_logprob(model, forget).detach()
    with torch.no_grad():
        for p, g in zip(model.parameters(), npo_grads):
            p -= 1e-2 * g
        after = sequence_logprob(model, forget)
    assert (after < before).all()
