"""Measure the models a run compares and complete what needs all of them (PrivLeak's reference).

target and unlearned, each at full precision and quantized, plus the retrain reference (whose own
PrivLeak AUC is the baseline). Each measurement is its own cached `Evaluation` stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from qubench.evaluation.metrics import privleak


@dataclass
class Measured:
    """Raw metrics per model label (target_pre, target_post, pre, post, retrain) and PrivLeak's reference."""

    by_model: dict[str, dict[str, float | None]]
    auc_reference: dict


def measure_models(evaluations: dict, published_auc_retrain: float | None, task_name: str) -> Measured:
    """Metrics of every model in `evaluations` (label -> Evaluation stage), with PrivLeak computed
    against the retrain model's AUC when it was measured, else the task's published constant."""
    by_model = {label: dict(evaluation.metrics()) for label, evaluation in evaluations.items()}
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
    return Measured(by_model, auc_ref)
