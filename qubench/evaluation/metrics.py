"""MUSE's metric definitions, as plain functions of strings and numbers.

Everything here reproduces muse_bench's `metrics/` modules (Shi et al., 2024)
so that numbers are comparable with the MUSE paper and with arXiv 2410.16454:

* VerbMem / KnowMem: ROUGE-L F1 from `rouge_score` without stemming, scored as
  `scorer.score(target=gt, prediction=output)`; means are reported x100.
* KnowMem prompts: the ICL pairs, then the question, in MUSE's exact format;
  the generation is cut at MUSE's stop words before scoring.
* PrivLeak: Min-40% membership score per document, ROC AUC of forget
  (non-member, label 0) against holdout (member, label 1) on the negated
  score, relative to the retrain model's AUC.

The lm-eval task utilities (tasks/qubench_muse/utils.py) import these, so
generation metrics and their tests share one implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score

#: MUSE's generation budgets (eval.py defaults).
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
#: MUSE cuts KnowMem answers at these, in this order (metrics/knowmem.py).
KNOWMEM_STOP_WORDS = ("\n\n", "\nQuestion", "Question:")
#: MUSE reports PrivLeak with the Min-40% score ("forget_holdout_Min-40%").
MIN_K_FRACTION = 0.4

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


# Models evaluated in one process (a run's five, a grid group's quantized variants of one model)
# often give a probe the same continuation, and rouge_score's LCS is pure Python (~2 ms for a
# VerbMem pair): identical pairs are scored once. A pure function of two strings, so exact.
@functools.lru_cache(maxsize=1 << 14)
def rouge_l_f1(gt: str, output: str) -> float:
    """ROUGE-L F1 of `output` against the reference `gt` (0..1)."""
    return _ROUGE.score(target=gt, prediction=output)["rougeL"].fmeasure


def cut_at_stop_words(text: str, words: Sequence[str] = KNOWMEM_STOP_WORDS) -> str:
    """The prefix MUSE keeps: for each stop word in turn, keep what precedes it.

    No stripping: MUSE scores the text exactly as cut.
    """
    for word in words:
        text = text.split(word)[0]
    return text


def knowmem_prompt(question: str, icl: Sequence[tuple[str, str]]) -> str:
    """MUSE's few-shot QA prompt: ICL pairs, then the question, ending in "Answer: "."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in icl)
    return shots + f"Question: {question}\nAnswer: "


def muse_short_gt(tokenizer, gt: str, max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS) -> str:
    """The VerbMem reference MUSE actually scores against.

    MUSE encodes the gt with special tokens (so BOS counts towards the budget),
    keeps the first `max_new_tokens` ids and decodes them without special
    tokens: the reference is as long as the longest possible continuation.
    """
    ids = tokenizer(gt, add_special_tokens=True)["input_ids"][:max_new_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def min_k_score(token_logprobs: Sequence[float], fraction: float = MIN_K_FRACTION) -> float:
    """Min-K% membership score: minus the mean of the lowest K% token log-probs.

    MUSE's convention: lower = more member-like. MUSE takes
    k = int(n * fraction) tokens, which is 0 for documents of fewer than
    1/fraction tokens (MUSE then gets NaN); we use at least one token there,
    so such a document scores its single least likely token. Documents MUSE
    can score are unaffected.
    """
    if len(token_logprobs) == 0:
        raise ValueError("Min-K% needs at least one scored token (the document has at most one token)")
    k = max(1, int(len(token_logprobs) * fraction))
    lowest = np.sort(np.asarray(token_logprobs, dtype=np.float64))[:k]
    return float(-lowest.mean())


def privleak_auc_from_scores(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC separating holdout (member, 1) from forget (non-member, 0) on -score.

    A retrained model that never saw the forget set sits near 0.5 (MUSE-News
    retrain: 0.4772); a model that still memorises the forget set gives forget
    documents lower scores than holdout ones, pushing the AUC towards 0.
    """
    if not forget_scores or not holdout_scores:
        raise ValueError("PrivLeak AUC needs at least one forget and one holdout document")
    scores = np.asarray(list(forget_scores) + list(holdout_scores), dtype=np.float64)
    labels = np.asarray([0] * len(forget_scores) + [1] * len(holdout_scores))
    return float(roc_auc_score(labels, -scores))


def privleak(auc: float, auc_retrain: float) -> float:
    """MUSE's PrivLeak: relative AUC difference to the retrain model, x100."""
    if auc_retrain <= 0:
        raise ValueError(f"AUC_retrain must be positive, got {auc_retrain}")
    return (auc - auc_retrain) / auc_retrain * 100


def mean_x100(scores: Sequence[float]) -> float:
    """MUSE's aggregate: the mean per-probe score on a 0-100 scale."""
    if not scores:
        raise ValueError("no scores to average")
    return float(np.mean(scores) * 100)
