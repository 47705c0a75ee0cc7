"""What the faster evaluation of issue #14 relies on, pinned on the micro synth-news target.

- The batch size changes no metric value, no generation and no PrivLeak document score: the
  default went from 16 to 64 rows on the strength of this (benchmarks/eval_speed.py shows it on
  the default task's five models).
- Calling lm-eval's `evaluate` directly (to skip `simple_evaluate`'s per-model environment
  collection) gives exactly what `simple_evaluate` gave.
"""

from __future__ import annotations

import pytest

from qubench import registry
from qubench.engines.hf import HFEngine
from qubench.evaluation import evaluate as ev
from qubench.evaluation.metrics import rouge_l_f1
from qubench.stages import TaskData
from qubench.stages.models import models_stage
from qubench.specs import DEFAULT_BATCH_SIZE
from qubench.tasks import muse_layout

GENERATION_KEYS = ("verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("QUBENCH_HOME", str(tmp_path_factory.mktemp("home")))
    try:
        task = registry.create("tasks", "synth-news", {"size": "micro"})
        data_dir = TaskData(task).get()
        data = muse_layout.load(data_dir)
        target = models_stage(task, data, None, None, seed=0, progress=False).get_models().target_dir
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        yield model, AutoTokenizer.from_pretrained(target), data, data_dir
    finally:
        mp.undo()


def _evaluate(micro, batch_size: int, limit: int | None = None):
    model, tok, data, data_dir = micro
    return ev.evaluate_model(HFEngine.from_params({"batch_size": batch_size}), model, tok, data, data_dir,
                             auc_retrain=0.5, limit=limit)


def test_batch_size_changes_no_metric_and_no_generation(micro):
    # 3: many small batches (below 5 rows the CPU's matrix kernels change); 16: the old default
    # (padded batches, the last one short); the default: every probe set in one batch.
    reports = {bs: _evaluate(micro, bs) for bs in (3, 16, DEFAULT_BATCH_SIZE)}
    first = reports[3]
    assert len(first.samples["verbmem_f"]) == 12 and len(first.samples["knowmem_f"]) == 12
    # a trained model, not noise: it reproduces some of its training text
    assert first.metrics["verbmem_f"] > first.metrics["verbmem_holdout"]
    for bs, report in reports.items():
        assert report.metrics == first.metrics, f"batch size {bs} changed a metric"
        for key in GENERATION_KEYS:
            assert [(s["output"], s["score"]) for s in report.samples[key]] == \
                   [(s["output"], s["score"]) for s in first.samples[key]], f"batch size {bs} changed {key}"
        # PrivLeak: every document's Min-40% score, not only the AUC over their ranks
        for key in ("privleak_forget", "privleak_holdout"):
            assert report.samples[key] == first.samples[key], f"batch size {bs} changed {key}"


def test_evaluate_path_equals_simple_evaluate(micro, monkeypatch):
    import lm_eval

    model, tok, data, data_dir = micro
    engine = HFEngine.from_params({"batch_size": 8})
    tasks = list(ev.GENERATION_TASKS)
    ours = ev._run_generation(engine, model, tok, data_dir, tasks, limit=3)

    def via_simple_evaluate(engine, model, tokenizer, data_root, tasks, limit):
        from lm_eval.tasks import TaskManager

        with ev._tokenizer_path(tokenizer) as tok_path, ev._quiet_lm_eval():
            manager = TaskManager(include_path=str(ev.tasks_dir()), include_defaults=False,
                                  metadata={"data_root": str(data_root), "tokenizer": tok_path})
            results = lm_eval.simple_evaluate(
                model=engine.lm(model, tokenizer), tasks=tasks, task_manager=manager, limit=limit,
                bootstrap_iters=0, log_samples=True, use_cache=None, cache_requests=False,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        return ({ev.GENERATION_TASKS[t]: results["results"][t][ev._LM_EVAL_METRIC] * 100 for t in tasks},
                {ev.GENERATION_TASKS[t]: ev._sample_log(t, results["samples"][t]) for t in tasks})

    theirs = via_simple_evaluate(engine, model, tok, data_dir, tasks, limit=3)
    assert ours == theirs
    assert [len(ours[1][k]) for k in GENERATION_KEYS] == [3] * 5


def test_rouge_cache_returns_what_rouge_score_computes():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("the council approved a budget", "the council approved it"), ("a b c", "c b a"), ("x", "")]
    for gt, out in pairs + pairs:  # the second round is answered from the cache
        assert rouge_l_f1(gt, out) == scorer.score(target=gt, prediction=out)["rougeL"].fmeasure
    assert rouge_l_f1.cache_info().hits >= len(pairs)
