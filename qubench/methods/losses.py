"""The loss terms MUSE's baselines combine, written once and tested against hand-computed values.

All functions take a causal LM (anything called as
`model(input_ids=..., attention_mask=..., use_cache=False)` returning `.logits`)
and a right-padded `TokenBatch`. Position t predicts token t+1; a prediction
counts only when both token t and token t+1 are real, so padding never
contributes.

Every mean divides by `divisor(batch, unit, local count)`: the local count
for a whole batch, and for one rank's share of a micro-batch split across
data-parallel ranks the whole micro-batch's count over the number of ranks
(see `qubench.methods.data.ShareOf`), so that the gradient DDP/FSDP average
over ranks is exactly the gradient of the whole micro-batch's mean.

Deviations from MUSE's code, on purpose:
- NPO uses sequence log-likelihoods as in Zhang et al. (2024); MUSE's
  implementation subtracts raw logits instead.
- KLR is a true KL between next-token distributions (log-softmax first);
  MUSE passes raw logits to F.kl_div.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from qubench.methods.data import TokenBatch

Unit = Literal["sequences", "label_tokens", "positions"]


def divisor(batch: TokenBatch, unit: Unit, local_count: torch.Tensor) -> torch.Tensor | float:
    """What a sum over `unit`s of `batch` is divided by to give its share of the micro-batch mean."""
    return local_count if batch.share_of is None else getattr(batch.share_of, unit)


def logits_of(model, batch: TokenBatch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits.float()  # float32 log-softmax even for half-precision models


def label_mask(batch: TokenBatch) -> torch.Tensor:
    """[batch, time-1] float mask of the predictions that have a real token on both sides."""
    mask = batch.attention_mask
    return (mask[:, :-1] * mask[:, 1:]).float()


def token_logprobs(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """[batch, time-1] log-probability of each next token (padding positions included, mask them)."""
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    return log_probs.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def mean_nll(model, batch: TokenBatch) -> torch.Tensor:
    """Next-token cross-entropy averaged over every real label token in the batch (HF's `labels=` loss)."""
    mask = label_mask(batch)
    return -(token_logprobs(logits_of(model, batch), batch) * mask).sum() / divisor(batch, "label_tokens", mask.sum())


def sequence_logprob(model, batch: TokenBatch) -> torch.Tensor:
    """[batch] log-likelihood of each sequence: sum of its real label tokens' log-probs."""
    return (token_logprobs(logits_of(model, batch), batch) * label_mask(batch)).sum(dim=-1)


def gradient_ascent_loss(model, forget: TokenBatch) -> torch.Tensor:
    """GA: minimising -CE is gradient ascent on the forget NLL."""
    return -mean_nll(model, forget)


def retain_nll_loss(model, retain: TokenBatch) -> torch.Tensor:
    """GDR: plain gradient descent on the retain NLL."""
    return mean_nll(model, retain)


def kl_to_reference(model, reference, retain: TokenBatch) -> torch.Tensor:
    """KLR: KL(P_reference || P_model) over the vocabulary, averaged over real input positions.

    sum_v p_ref(v) * (log p_ref(v) - log p_model(v)), i.e. what
    F.kl_div(model_log_probs, ref_log_probs, log_target=True) computes per
    position. Every real position counts (also the last, whose next token is
    unknown: its distribution is still the model's behaviour on retain data).
    """
    log_q = F.log_softmax(logits_of(model, retain), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(logits_of(reference, retain), dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    mask = retain.attention_mask.float()
    return (per_position * mask).sum() / divisor(retain, "positions", mask.sum())


def npo_loss(model, reference, forget: TokenBatch, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024): -(2/beta) * mean_seq logsigmoid(-beta * (log p_model - log p_ref)).

    Equals (2/beta) * log 2 while model == reference; its gradient pushes the
    forget likelihood down, with a weight that vanishes as the model's
    likelihood falls below the reference's (unlike GA, which never stops).
    """
    with torch.no_grad():
        reference_logprob = sequence_logprob(reference, forget)
    log_ratio = sequence_logprob(model, forget) - reference_logprob
    per_sequence = F.logsigmoid(-beta * log_ratio)
    mean = per_sequence.mean() if forget.share_of is None else per_sequence.sum() / forget.share_of.sequences
    return -(2.0 / beta) * mean
