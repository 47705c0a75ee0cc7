"""MUSE metric definitions on hand-computed cases."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from qubench.evaluation.metrics import (
    KNOWMEM_MAX_NEW_TOKENS,
    KNOWMEM_STOP_WORDS,
    VERBMEM_MAX_NEW_TOKENS,
    cut_at_stop_words,
    knowmem_prompt,
    mean_x100,
    min_k_score,
    muse_short_gt,
    privleak,
    privleak_auc_from_scores,
    rouge_l_f1,
)

TASK_FOLDER = Path(__file__).resolve().parents[1] / "tasks" / "qubench_muse"


def load_task_utils():
    spec = importlib.util.spec_from_file_location("qubench_muse_utils", TASK_FOLDER / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_one_substitution():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F1 = 5/6.
    assert rouge_l_f1("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)


def test_rouge_l_unequal_lengths():
    # LCS 2; P = 2/2, R = 2/4 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert rouge_l_f1("a b c d", "a b") == pytest.approx(2 / 3)


def test_rouge_l_word_order_counts():
    # gt [the council of varnholt], output [varnholt council]: LCS 1, P 1/2, R 1/4 -> F1 1/3.
    assert rouge_l_f1("The council of Varnholt", "Varnholt council") == pytest.approx(1 / 3)


def test_rouge_l_identical_disjoint_and_normalised():
    assert rouge_l_f1("Paris is big", "Paris is big") == 1.0
    assert rouge_l_f1("Paris is big", "london was small") == 0.0
    # rouge_score lowercases and drops punctuation, without stemming.
    assert rouge_l_f1("Paris.", "paris") == 1.0
    assert rouge_l_f1("cats", "cat") == 0.0
    assert rouge_l_f1("Paris", "") == 0.0


def test_mean_x100():
    assert mean_x100([1.0, 0.5, 0.0, 0.5]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        mean_x100([])


# ---------------------------------------------------------------- KnowMem cutting and prompt


def test_cut_at_stop_words_like_muse():
    assert KNOWMEM_STOP_WORDS == ("\n\n", "\nQuestion", "Question:")
    assert cut_at_stop_words("Paris\n\nQuestion: x") == "Paris"
    assert cut_at_stop_words("A\nQuestion B") == "A"
    assert cut_at_stop_words("Question: what") == ""
    # Words are applied in turn, each on what the previous one kept.
    assert cut_at_stop_words("x Question: y\n\nz") == "x "
    # No stripping: MUSE scores the text exactly as cut.
    assert cut_at_stop_words(" Paris \nLondon") == " Paris \nLondon"


def test_knowmem_prompt_format():
    prompt = knowmem_prompt("Who won?", [("Q1?", "A1"), ("Q2?", "A2")])
    assert prompt == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Who won?\nAnswer: "
    assert knowmem_prompt("Who won?", []) == "Question: Who won?\nAnswer: "


def test_knowmem_prompt_on_real_muse_news(shared_data, monkeypatch):
    root = shared_data / "muse-news"
    qa = json.loads((root / "knowmem/forget_qa.json").read_text(encoding="utf-8"))
    icl = json.loads((root / "knowmem/forget_qa_icl.json").read_text(encoding="utf-8"))
    expected = (
        "\n\n".join("Question: " + d["question"] + "\nAnswer: " + d["answer"] for d in icl)
        + "\n\nQuestion: " + qa[0]["question"] + "\nAnswer: "
    )
    assert expected.startswith(
        "Question: How much total prize money are Mark Selby and Kyren Wilson set to share for making "
        "maximum breaks at the Crucible?\nAnswer: £55,000\n\nQuestion: What disciplinary measure"
    )
    assert expected.endswith(
        "Answer: Edilnord\n\nQuestion: What year did the Orkney Islands become part of Scotland?\nAnswer: "
    )
    icl_pairs = [(d["question"], d["answer"]) for d in icl]
    assert knowmem_prompt(qa[0]["question"], icl_pairs).encode() == expected.encode()

    # The lm-eval task builds the same bytes from the data folder.
    utils = load_task_utils()
    monkeypatch.delenv(utils.DATA_ROOT_ENV, raising=False)
    docs = utils.load_knowmem_forget(data_root=str(root))["test"]
    assert len(docs) == len(qa)
    assert utils.knowmem_doc_to_text(docs[0]).encode() == expected.encode()


def test_knowmem_process_results_cuts_before_scoring():
    utils = load_task_utils()
    doc = {"question": "q", "answer": "The council of Varnholt", "icl_questions": [], "icl_answers": []}
    assert utils.knowmem_process_results(doc, ["The council of Varnholt\nQuestion: x"]) == {"rougeL_f1": 1.0}
    assert utils.knowmem_process_results(doc, ["Varnholt council\n\nThe council of Varnholt"]) == {
        "rougeL_f1": pytest.approx(1 / 3)
    }


# ---------------------------------------------------------------- VerbMem reference


class WordTokenizer:
    """One token per word, with BOS (id 0) prepended as a Llama tokenizer does."""

    def __init__(self):
        self.vocab = ["<s>"]

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))
        return {"input_ids": ([0] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


def test_muse_short_gt_counts_bos_in_the_budget():
    # Budget 4 = BOS + 3 words.
    assert muse_short_gt(WordTokenizer(), "a b c d e", max_new_tokens=4) == "a b c"
    assert muse_short_gt(WordTokenizer(), "a b", max_new_tokens=4) == "a b"


# ---------------------------------------------------------------- PrivLeak


def test_min_40_percent():
    # k = int(5 * 0.4) = 2 lowest: -5, -4 -> score 4.5 (lower = more member-like).
    assert min_k_score([-1, -2, -3, -4, -5]) == pytest.approx(4.5)
    assert min_k_score([-3, -1, -5, -2, -4]) == pytest.approx(4.5)
    # 10 tokens (-0.1 .. -1.0) -> k = 4 lowest: -1.0, -0.9, -0.8, -0.7 -> 0.85.
    assert min_k_score([-0.1 * i for i in range(1, 11)]) == pytest.approx(0.85)


def test_min_k_short_document_uses_one_token():
    # int(2 * 0.4) = 0: documented choice is the single lowest token.
    assert min_k_score([-1.0, -2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least one"):
        min_k_score([])


def test_auc_hand_computed_ranking():
    # On -score: forget (label 0) [-1, -3], holdout (label 1) [-2, -4].
    # Pairs where holdout ranks above forget: only (-2 > -3) -> 1 of 4.
    assert privleak_auc_from_scores([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.25)
    # A tie counts half.
    assert privleak_auc_from_scores([1.0], [1.0]) == pytest.approx(0.5)
    # Forget documents less member-like than holdout -> AUC 1.
    assert privleak_auc_from_scores([5.0, 6.0], [1.0, 2.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        privleak_auc_from_scores([], [1.0])


def test_privleak_formula_and_sign():
    assert privleak(0.5, 0.4) == pytest.approx(25.0)
    assert privleak(0.4772, 0.4772) == pytest.approx(0.0)
    # A model that still memorises the forget set: its forget documents score
    # lower (more member-like) than the holdout ones -> AUC 0 -> PrivLeak -100.
    memorised_auc = privleak_auc_from_scores([0.2, 0.3, 0.25], [3.1, 2.9, 3.4])
    assert memorised_auc == 0.0
    assert privleak(memorised_auc, 0.4772) == pytest.approx(-100.0)
    with pytest.raises(ValueError):
        privleak(0.5, 0.0)


# ---------------------------------------------------------------- task YAMLs agree with MUSE's settings


class _TaskYamlLoader(yaml.SafeLoader):
    pass


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _yaml(name):
    return yaml.load((TASK_FOLDER / name).read_text(), Loader=_TaskYamlLoader)


def test_task_generation_settings_match_muse():
    verbmem = _yaml("_verbmem_template.yaml")["generation_kwargs"]
    knowmem = _yaml("_knowmem_template.yaml")["generation_kwargs"]
    assert verbmem == {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": VERBMEM_MAX_NEW_TOKENS}
    assert knowmem == {
        "until": list(KNOWMEM_STOP_WORDS), "do_sample": False, "temperature": 0.0,
        "max_gen_toks": KNOWMEM_MAX_NEW_TOKENS,
    }
    assert (VERBMEM_MAX_NEW_TOKENS, KNOWMEM_MAX_NEW_TOKENS) == (128, 32)
    group = _yaml("_qubench_muse.yaml")
    assert group["group"] == "qubench_muse"
    assert group["task"] == [
        "qubench_verbmem_forget", "qubench_verbmem_holdout", "qubench_verbmem_retain", "qubench_knowmem_forget",
        "qubench_knowmem_retain",
    ]
    for task in group["task"]:
        assert _yaml(f"{task}.yaml")["task"] == task
