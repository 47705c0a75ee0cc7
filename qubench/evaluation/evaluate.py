"""Measure one model with MUSE's metrics.

Generation metrics (VerbMem, KnowMem) run as lm-eval tasks from the package's
`lm_eval_tasks/qubench_muse` folder (`tasks/` in the repository) through the
engine's `LM`; PrivLeak is computed here from the engine's per-token log-probs.
Tasks with a classification view (`classify/` in the data folder) also get label
accuracy from the `multiple_choice` tasks in `lm_eval_tasks/qubench_classify`, which need the LM's
loglikelihood. Nothing is cached to disk and no hub access is needed: task
data is read from `data_root`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qubench import metric_catalog
from qubench.engines.base import Engine
from qubench.errors import ConfigError
from qubench.evaluation.metrics import cut_at_stop_words, min_k_score, privleak, privleak_auc_from_scores
from qubench.tasks.muse_layout import TaskData

TASKS_DIR_ENV = "QUBENCH_TASKS_DIR"
TASK_FOLDER = "qubench_muse"
#: lm-eval task -> qubench metric name, from the metric catalogue: generation tasks (ROUGE-L) and,
#: for tasks with a classification view, multiple-choice tasks (accuracy x100).
GENERATION_TASKS = {m.lm_eval_task: m.name for m in metric_catalog.METRICS if m.view == "generation"}
CLASSIFY_TASKS = {m.lm_eval_task: m.name for m in metric_catalog.METRICS if m.view == "classification"}
CLASSIFY_FOLDER = "qubench_classify"
_LM_EVAL_METRIC = "rougeL_f1,none"
_ACC_METRIC = "acc,none"
#: simple_evaluate's default few-shot sampler seed (lm_eval.defaults.DEFAULT_OTHER_SEED).
_FEWSHOT_SEED = 1234


@dataclass
class EvalReport:
    """MUSE metrics of one model, plus what produced them.

    metrics: verbmem_f, verbmem_holdout (None without holdout probes), knowmem_f,
    knowmem_r (absent for tasks without QA probes) on MUSE's 0-100 scale;
    privleak_auc raw (0-1); privleak in % (None without an AUC_retrain); cls_*
    label accuracies x100 only for tasks with a classification view. samples: per
    probe set, JSON-ready dicts (prompt, gt, output, score in 0-1; classification
    rows add the choices and their loglikelihoods); privleak_forget/privleak_holdout
    hold each document's Min-40% score and token count.
    """

    metrics: dict[str, float | None]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def packaged_tasks_dir() -> Path:
    """The task suite shipped inside the qubench package (`tasks/` in the repository links to it)."""
    from importlib.resources import files

    return Path(str(files("qubench") / "lm_eval_tasks"))


def tasks_dir() -> Path:
    """The folder lm-eval searches for task YAMLs: $QUBENCH_TASKS_DIR, else the packaged suite."""
    override = os.environ.get(TASKS_DIR_ENV)
    path = Path(override).expanduser() if override else packaged_tasks_dir()
    if not (path / TASK_FOLDER).is_dir():
        source = f"${TASKS_DIR_ENV}" if override else "the installed qubench package"
        raise ConfigError(
            f"lm-eval task folder {path / TASK_FOLDER} not found (tasks dir from {source}); "
            f"set {TASKS_DIR_ENV} to the folder that contains {TASK_FOLDER}/"
        )
    return path


def evaluate_model(
    engine: Engine,
    model: Any,
    tokenizer: Any,
    data: TaskData,
    data_root: Path,
    auc_retrain: float | None,
    limit: int | None = None,
) -> EvalReport:
    """VerbMem, KnowMem and PrivLeak of `model`; `limit` caps every probe set (for quick runs)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of probes, got {limit}")
    optional = {"qubench_verbmem_holdout": data.verbmem_holdout, "qubench_verbmem_retain": data.verbmem_retain}
    tasks = [t for t in GENERATION_TASKS if optional.get(t, True)]
    metrics: dict[str, float | None] = dict.fromkeys(GENERATION_TASKS.values())
    if not (data.knowmem_forget or data.knowmem_retain):
        # No facts to ask about (e.g. social-media posts): KnowMem does not apply, so it is left
        # out rather than reported as a score of zero.
        tasks = [t for t in tasks if "knowmem" not in t]
        del metrics["knowmem_f"], metrics["knowmem_r"]
    if data.classify_format is not None:
        _require_classify_tasks()
        sets = {"qubench_classify_forget": data.classify_forget, "qubench_classify_holdout": data.classify_holdout,
                "qubench_classify_retain": data.classify_retain, "qubench_classify_test": data.classify_test}
        tasks += [t for t, items in sets.items() if items]
    gen_metrics, samples = _run_generation(engine, model, tokenizer, Path(data_root), tasks, limit)
    metrics.update(gen_metrics)

    forget_docs = data.privleak_forget[:limit] if limit else data.privleak_forget
    holdout_docs = data.privleak_holdout[:limit] if limit else data.privleak_holdout
    max_length = engine.max_length(model, tokenizer)
    forget_scores, samples["privleak_forget"] = _min_k_scores(engine, model, tokenizer, forget_docs, max_length)
    holdout_scores, samples["privleak_holdout"] = _min_k_scores(engine, model, tokenizer, holdout_docs, max_length)
    auc = privleak_auc_from_scores(forget_scores, holdout_scores)
    metrics["privleak_auc"] = auc
    metrics["privleak"] = None if auc_retrain is None else privleak(auc, auc_retrain)
    return EvalReport(metrics=metrics, samples=samples)


def _require_classify_tasks() -> None:
    if not (tasks_dir() / CLASSIFY_FOLDER).is_dir():
        raise ConfigError(f"the task data has a classification view but {tasks_dir() / CLASSIFY_FOLDER} "
                          f"is missing; point ${TASKS_DIR_ENV} at a tasks folder that has it")


def privleak_auc(
    engine: Engine, model: Any, tokenizer: Any, forget_docs: list[str], holdout_docs: list[str],
    max_length: int | None = None,
) -> float:
    """The Min-40% forget-vs-holdout AUC alone, e.g. a retrain model's AUC_retrain."""
    if max_length is None:
        max_length = engine.max_length(model, tokenizer)
    forget_scores, _ = _min_k_scores(engine, model, tokenizer, forget_docs, max_length)
    holdout_scores, _ = _min_k_scores(engine, model, tokenizer, holdout_docs, max_length)
    return privleak_auc_from_scores(forget_scores, holdout_scores)


def _min_k_scores(engine, model, tokenizer, docs: list[str], max_length: int):
    logprobs = engine.token_logprobs(model, tokenizer, docs, max_length)
    scores, log = [], []
    for i, lp in enumerate(logprobs):
        try:
            scores.append(min_k_score(lp))
        except ValueError:
            raise ValueError(f"PrivLeak document {i} ({docs[i][:40]!r}...) has no token to score") from None
        log.append({"index": i, "score": scores[-1], "n_tokens": len(lp) + 1})
    return scores, log


def _run_generation(engine, model, tokenizer, data_root: Path, tasks: list[str], limit: int | None):
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    with _tokenizer_path(tokenizer) as tok_path, _quiet_lm_eval():
        # include_defaults=False: indexing lm-eval's own few thousand YAMLs is slow and not needed.
        manager = TaskManager(
            include_path=str(tasks_dir()), include_defaults=False,
            metadata={"data_root": str(data_root), "tokenizer": tok_path},
        )
        loaded = manager.load(tasks)
        for task in loaded["tasks"].values():
            # What simple_evaluate does to each task before evaluating (our tasks have no few-shot
            # examples, so neither setting changes a prompt; kept so the two paths cannot differ).
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=_FEWSHOT_SEED)
        # lm_eval.evaluator.evaluate, not simple_evaluate: the latter also records the environment
        # for every model (`pip list`, `git describe` and ~10 more subprocesses: 0.7 s of CPU and
        # several seconds of wall time per model on a busy machine) into a dict we throw away.
        # Greedy decoding needs no seeds; none is set, so the caller's RNG state stays intact.
        results = evaluate(
            lm=engine.lm(model, tokenizer), task_dict=loaded, limit=limit, bootstrap_iters=0,
            log_samples=True, cache_requests=False,
        )
    metrics, samples = {}, {}
    for t in tasks:
        name = GENERATION_TASKS.get(t) or CLASSIFY_TASKS[t]
        key = _ACC_METRIC if t in CLASSIFY_TASKS else _LM_EVAL_METRIC
        metrics[name] = results["results"][t][key] * 100
        samples[name] = _sample_log(t, results["samples"][t])
    return metrics, samples


def _sample_log(task: str, logged: list[dict]) -> list[dict[str, Any]]:
    rows = []
    if task in CLASSIFY_TASKS:
        for s in sorted(logged, key=lambda s: s["doc_id"]):
            # One (loglikelihood, is_greedy) pair per choice; the prediction is the likeliest choice.
            logliks = [float(r[0]) for r in s["filtered_resps"]]
            choices = s["doc"]["choices"]
            rows.append({"prompt": s["arguments"][0][0], "gt": s["doc"]["label"], "choices": choices,
                         "loglikelihoods": logliks, "output": choices[logliks.index(max(logliks))],
                         "score": s["acc"]})
        return rows
    for s in sorted(logged, key=lambda s: s["doc_id"]):
        raw = s["filtered_resps"][0]
        row = {"prompt": s["arguments"][0][0], "gt": s["target"], "output": raw, "score": s["rougeL_f1"]}
        if "knowmem" in task:
            row.update(question=s["doc"]["question"], output=cut_at_stop_words(raw), raw_output=raw)
        rows.append(row)
    return rows


@contextlib.contextmanager
def _tokenizer_path(tokenizer) -> Iterator[str]:
    """A local folder holding `tokenizer`, for the VerbMem loader (lm-eval metadata must stay plain data)."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    if name and Path(name).is_dir():
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="qubench-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield tmp


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Hide lm-eval's per-task INFO/WARNING chatter (e.g. the --limit and custom-kwargs notices), and its
    `git describe --always` of the working directory: simple_evaluate records the git hash of whatever
    folder the user runs from (not lm-eval's, not qubench's: qubench records its own commit in the
    result's environment), and outside a checkout git prints "fatal: not a git repository" straight to
    the terminal. lm-eval has no setting for either; its progress bars: qubench.quiet."""
    import lm_eval.evaluator

    logger = logging.getLogger("lm_eval")
    old, git_hash = logger.level, lm_eval.evaluator.get_git_commit_hash
    logger.setLevel(logging.ERROR)
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(old)
        lm_eval.evaluator.get_git_commit_hash = git_hash
