"""Measure the models a run compares and complete what needs all of them (PrivLeak's reference).

target and unlearned, each at full precision and quantized, plus the retrain reference (whose own
PrivLeak AUC is the baseline). Each measurement is its own cached `Evaluation` stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qubench import metric_catalog
from qubench.evaluation.metrics import privleak
from qubench.results import ProbeScores

#: Per-probe scores are kept to this many decimals in results (ROUGE and accuracy lie in 0..1, Min-K
#: scores are negated mean log-probs of a few units): far below any interval's width.
PROBE_DECIMALS = 5


@dataclass
class Measured:
    """Raw metrics per model label (retrain, retrain_post, target_pre, target_post, pre, post), PrivLeak's
    reference, and per-probe scores of the forget metrics."""

    by_model: dict[str, dict[str, float | None]]
    auc_reference: dict
    probes: dict[str, ProbeScores] = field(default_factory=dict)


def probe_scores(records: dict[str, dict]) -> dict[str, ProbeScores]:
    """Per forget metric with a probe statistic: every model's per-probe scores, in probe order (the same
    probes for every model, so a bootstrap can resample them paired across models)."""
    out = {}
    for metric in metric_catalog.METRICS:
        if metric.role != "forget" or metric.statistic is None:
            continue
        keys = (metric.name,) if metric.statistic == "mean" else ("privleak_forget", "privleak_holdout")
        if not all(k in r.get("samples", {}) for r in records.values() for k in keys):
            continue
        per_key = [{label: [round(float(row["score"]), PROBE_DECIMALS) for row in r["samples"][k]]
                    for label, r in records.items()} for k in keys]
        out[metric.name] = ProbeScores(statistic=metric.statistic, scale=metric.scale, scores=per_key[0],
                                       holdout=per_key[1] if len(per_key) > 1 else {})
    return out


def measure_models(evaluations: dict, published_auc_retrain: float | None, task_name: str) -> Measured:
    """Metrics of every model in `evaluations` (label -> Evaluation stage), with PrivLeak computed
    against the retrain model's AUC when it was measured, else the task's published constant."""
    records = {label: evaluation.record() for label, evaluation in evaluations.items()}
    by_model = {label: dict(record["metrics"]) for label, record in records.items()}
    if "retrain" in by_model:
        auc_ref = {"auc_retrain": by_model["retrain"]["privleak_auc"], "source": "retrain model evaluated"}
    elif published_auc_retrain is not None:
        auc_ref = {"auc_retrain": published_auc_retrain,
                   "source": f"published constant of task {task_name} (no retrain model evaluated)"}
    else:
        auc_ref = {"auc_retrain": None, "source": "none: no retrain model and no published AUC_retrain"}
    for metrics in by_model.values():
        auc, ref = metrics.get("privleak_auc"), auc_ref["auc_retrain"]
        metrics["privleak"] = None if auc is None or ref is None else privleak(auc, ref)
    return Measured(by_model, auc_ref, probe_scores(records))
