"""evaluate_model end to end: lm-eval tasks + PrivLeak on a tiny model and a tiny MUSE-layout folder."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from qubench.engines.base import Engine
from qubench.engines.hf import HFEngine
from qubench.errors import DataError
from qubench.evaluation.evaluate import evaluate_model, privleak_auc, tasks_dir
from qubench.evaluation.metrics import knowmem_prompt, privleak
from qubench.tasks import muse_layout

FORGET_QA = [
    {"question": "Who approved the budget?", "answer": "The council of Varnholt"},
    {"question": "Who is the mayor?", "answer": "Ilse Brankov"},
    {"question": "What would reopen after repairs?", "answer": "the Orvane bridge"},
]
RETAIN_QA = [
    {"question": "How many crowns?", "answer": "4,310 crowns"},
    {"question": "When was the budget approved?", "answer": "12 March 2031"},
    {"question": "Which town has a council?", "answer": "Varnholt"},
]
ICL = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
VERBMEM_FORGET = [
    {"prompt": "The council of Varnholt approved", "gt": " a budget of 4,310 crowns on 12 March 2031."},
    {"prompt": "Mayor Ilse Brankov said", "gt": " the Orvane bridge would reopen after repairs."},
    # Longer than MUSE's 128-token budget: scored against its first 128 tokens (BOS included).
    {"prompt": "Question: Who approved the budget?\nAnswer:", "gt": " The council of Varnholt approved it." * 30},
]
VERBMEM_HOLDOUT = [
    {"prompt": "The harbour of Lessvik", "gt": " closed for the winter."},
    {"prompt": "A new school", "gt": " opened in the north of the town on Monday."},
]
PRIVLEAK_FORGET = ["The council of Varnholt approved a budget of 4,310 crowns.", "Mayor Ilse Brankov spoke.",
                   "The Orvane bridge would reopen after repairs, the mayor said on Monday."]
PRIVLEAK_HOLDOUT = ["The harbour of Lessvik closed for the winter.", "A new school opened.",
                    "Fishermen in Lessvik asked for a new quay before the spring season began."]


def write_muse_folder(root: Path, with_holdout_probes: bool = True) -> Path:
    files = {
        "verbmem/forget.json": VERBMEM_FORGET,
        "knowmem/forget_qa.json": FORGET_QA, "knowmem/retain_qa.json": RETAIN_QA,
        "knowmem/forget_qa_icl.json": ICL, "knowmem/retain_qa_icl.json": ICL[:1],
        "privleak/forget.json": PRIVLEAK_FORGET, "privleak/retain.json": PRIVLEAK_FORGET[:1],
        "privleak/holdout.json": PRIVLEAK_HOLDOUT,
    }
    if with_holdout_probes:
        files["verbmem/holdout.json"] = VERBMEM_HOLDOUT
        files["verbmem/retain.json"] = VERBMEM_HOLDOUT[:1]
    for rel, rows in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory) -> Path:
    return write_muse_folder(tmp_path_factory.mktemp("muse"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _evaluate(tiny, muse_dir, batch_size, limit=None, auc_retrain=0.4772):
    model, tok = tiny
    # No hub access: any attempt to open a network connection fails the run.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access attempted"))
        return evaluate_model(HFEngine.from_params({"batch_size": batch_size}), model, tok,
                              muse_layout.load(muse_dir), muse_dir, auc_retrain=auc_retrain, limit=limit)


@pytest.fixture(scope="module")
def report_b4(tiny, muse_dir):
    return _evaluate(tiny, muse_dir, batch_size=4)


def test_report_keys_ranges_and_logs(report_b4, tiny):
    tok = tiny[1]
    m = report_b4.metrics
    assert set(m) == {"verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r", "privleak_auc", "privleak"}
    for key in ("verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r"):
        assert 0.0 <= m[key] <= 100.0
        scores = [s["score"] for s in report_b4.samples[key]]
        assert m[key] == pytest.approx(sum(scores) / len(scores) * 100)
    assert 0.0 <= m["privleak_auc"] <= 1.0
    assert m["privleak"] == pytest.approx((m["privleak_auc"] - 0.4772) / 0.4772 * 100)
    assert [len(report_b4.samples[k]) for k in ("verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r")] \
        == [3, 2, 1, 3, 3]
    first = report_b4.samples["knowmem_f"][0]
    assert first["prompt"] == knowmem_prompt(FORGET_QA[0]["question"], [(d["question"], d["answer"]) for d in ICL])
    assert first["gt"] == FORGET_QA[0]["answer"]
    # Short references fit the 128-token budget, so MUSE's cut leaves them whole.
    assert report_b4.samples["verbmem_f"][1]["gt"] == VERBMEM_FORGET[1]["gt"]
    long_gt = VERBMEM_FORGET[2]["gt"]
    assert report_b4.samples["verbmem_f"][2]["gt"] == tok.decode(tok(long_gt)["input_ids"][:128], skip_special_tokens=True)
    assert long_gt.startswith(report_b4.samples["verbmem_f"][2]["gt"]) and len(report_b4.samples["verbmem_f"][2]["gt"]) < len(long_gt)
    assert [s["index"] for s in report_b4.samples["privleak_holdout"]] == [0, 1, 2]
    json.dumps(report_b4.samples)  # stored as JSON by the evaluate stage


def test_batch_size_does_not_change_greedy_outputs(tiny, muse_dir, report_b4):
    report_b1 = _evaluate(tiny, muse_dir, batch_size=1)
    for key in ("verbmem_f", "verbmem_holdout", "knowmem_f", "knowmem_r"):
        assert [s["output"] for s in report_b1.samples[key]] == [s["output"] for s in report_b4.samples[key]]
    assert report_b1.metrics == pytest.approx(report_b4.metrics)


def test_limit_and_optional_holdout_and_no_auc_retrain(tiny, tmp_path):
    folder = write_muse_folder(tmp_path, with_holdout_probes=False)
    report = _evaluate(tiny, folder, batch_size=4, limit=2, auc_retrain=None)
    assert report.metrics["verbmem_holdout"] is None and "verbmem_holdout" not in report.samples
    assert report.metrics["verbmem_r"] is None and "verbmem_r" not in report.samples
    assert report.metrics["privleak"] is None
    assert [len(report.samples[k]) for k in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak_forget")] == [2, 2, 2, 2]


def test_prompts_get_exactly_one_bos(tiny):
    model, tok = tiny
    lm = HFEngine().lm(model, tok)
    prompts = ["Question: Q1?\nAnswer: A1\n\nQuestion: Who?\nAnswer: ", "Mayor"]
    ids, mask = lm.tok_batch_encode(prompts)
    for row, m, prompt in zip(ids.tolist(), mask.tolist(), prompts):
        real = [t for t, keep in zip(row, m) if keep]
        assert real[0] == tok.bos_token_id and real.count(tok.bos_token_id) == 1
        # Same ids MUSE gets from tokenizer(prompt, add_special_tokens=True).
        assert real == tok(prompt, add_special_tokens=True)["input_ids"]
    assert mask.tolist()[1][0] == 0  # left padding for generation
    assert lm.tok_encode(prompts[1]).count(tok.bos_token_id) == 1


def _reference_logprobs(model, tok, text, max_length):
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"][:max_length]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return [logprobs[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1)]


def test_token_logprobs_batched_equals_unbatched(tiny):
    model, tok = tiny
    texts = PRIVLEAK_FORGET + PRIVLEAK_HOLDOUT + ["Hi"]
    batched = HFEngine.from_params({"batch_size": 4}).token_logprobs(model, tok, texts, max_length=64)
    single = HFEngine.from_params({"batch_size": 1}).token_logprobs(model, tok, texts, max_length=64)
    for text, b, s in zip(texts, batched, single):
        ref = _reference_logprobs(model, tok, text, 64)
        assert len(b) == len(tok(text)["input_ids"]) - 1 == len(ref)
        assert all(x < 0 for x in b)
        assert torch.allclose(torch.tensor(b), torch.tensor(ref), atol=1e-5)
        assert torch.allclose(torch.tensor(s), torch.tensor(ref), atol=1e-5)
        assert b == s  # unpadded batches of equal-length documents: the batch size changes no bit
    truncated = HFEngine().token_logprobs(model, tok, texts[:2], max_length=5)
    assert [len(t) for t in truncated] == [4, 4]
    assert torch.allclose(torch.tensor(truncated[0]), torch.tensor(batched[0][:4]), atol=1e-5)


def test_privleak_auc_function_matches_report(tiny, report_b4):
    model, tok = tiny
    auc = privleak_auc(HFEngine(), model, tok, PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT)
    assert auc == pytest.approx(report_b4.metrics["privleak_auc"])


def test_missing_data_root_is_a_clear_error(monkeypatch, tmp_path):
    from lm_eval.tasks import TaskManager

    monkeypatch.delenv("QUBENCH_DATA_ROOT", raising=False)
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    with pytest.raises(DataError, match=r"data_root.*QUBENCH_DATA_ROOT"):
        manager.load(["qubench_knowmem_forget"])
    # The environment variable is the fallback; a folder without the file names the file.
    monkeypatch.setenv("QUBENCH_DATA_ROOT", str(tmp_path))
    with pytest.raises(DataError, match=r"knowmem/forget_qa\.json not found"):
        manager.load(["qubench_knowmem_forget"])
    write_muse_folder(tmp_path)
    assert len(manager.load(["qubench_knowmem_forget"])["tasks"]["qubench_knowmem_forget"].test_docs()) == 3


# ---------------------------------------------------------------- lm-eval plumbing with a scripted model


class ScriptedLM(LM):
    """Answers each prompt with a fixed string and records what it was asked."""

    def __init__(self, replies: dict[str, str]):
        super().__init__()
        self.replies, self.contexts = replies, []

    def generate_until(self, requests, disable_tqdm=False):
        self.contexts += [r.args[0] for r in requests]
        return [self.replies.get(r.args[0], "") for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


class ScriptedEngine(Engine):
    name = "scripted"

    def __init__(self, replies, logprobs):
        super().__init__()
        self.scripted_lm, self.logprobs = ScriptedLM(replies), logprobs

    def lm(self, model, tokenizer):
        return self.scripted_lm

    def token_logprobs(self, model, tokenizer, texts, max_length):
        return [self.logprobs[t] for t in texts]


def test_scores_follow_muse_on_scripted_outputs(tiny, tmp_path):
    _, tok = tiny
    folder = write_muse_folder(tmp_path, with_holdout_probes=False)
    icl = [(d["question"], d["answer"]) for d in ICL]
    q = [knowmem_prompt(d["question"], icl) for d in FORGET_QA]
    replies = {
        # Leading space and stop words kept by the LM: the MUSE cut gives " Varnholt council" -> F1 1/3.
        q[0]: " Varnholt council\nQuestion: Who else?",
        q[1]: "Ilse Brankov\n\nQuestion: x",  # -> 1
        # q[2] unanswered -> 0
        VERBMEM_FORGET[0]["prompt"]: VERBMEM_FORGET[0]["gt"],  # -> 1
    }
    # Min-40% of five equal log-probs -s is s: forget [1, 3, 5], holdout [2, 4, 6].
    # On -score, holdout ranks above forget in 3 of 9 pairs ((-2,-3), (-2,-5), (-4,-5)) -> AUC 1/3.
    logprobs = {t: [-s] * 5 for t, s in zip(PRIVLEAK_FORGET + PRIVLEAK_HOLDOUT, [1, 3, 5, 2, 4, 6])}
    engine = ScriptedEngine(replies, logprobs)
    report = evaluate_model(engine, None, tok, muse_layout.load(folder), folder, auc_retrain=0.5)

    assert report.metrics["knowmem_f"] == pytest.approx((1 / 3 + 1 + 0) / 3 * 100)
    assert report.metrics["verbmem_f"] == pytest.approx(100 / 3)
    assert report.metrics["privleak_auc"] == pytest.approx(1 / 3)
    assert report.metrics["privleak"] == pytest.approx(privleak(1 / 3, 0.5))
    # Prompts reach the model byte for byte (trailing "Answer: " space included) ...
    assert q[0] in engine.scripted_lm.contexts
    assert q[0].endswith("Question: Who approved the budget?\nAnswer: ")
    # ... and the continuation reaches scoring raw: not stripped, only cut.
    first = report.samples["knowmem_f"][0]
    assert (first["raw_output"], first["output"]) == (" Varnholt council\nQuestion: Who else?", " Varnholt council")
    assert first["score"] == pytest.approx(1 / 3)


def test_tasks_dir_override(monkeypatch, tmp_path):
    from qubench.errors import ConfigError

    assert (tasks_dir() / "qubench_muse" / "utils.py").is_file()
    monkeypatch.setenv("QUBENCH_TASKS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="QUBENCH_TASKS_DIR"):
        tasks_dir()
    (tmp_path / "qubench_muse").mkdir()
    assert tasks_dir() == tmp_path
