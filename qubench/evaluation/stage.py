"""The evaluate stage of a run: measure the five models a run compares.

target and unlearned, each at full precision and quantized, plus the retrain
reference (whose own PrivLeak AUC is the baseline). Each measurement is
cached by (model, engine, evaluation settings, data), so the target's
evaluations are shared by every method that uses that target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qubench import store
from qubench.fingerprint import model_fingerprint
from qubench.specs import RunSpec

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
# 2: PrivLeak log-probs from unpadded equal-length batches (document scores move in the last bits).
EVAL_CODE_VERSION = 2


@dataclass
class Measured:
    """Raw metrics per model label: target_pre, target_post, pre, post, retrain."""

    by_model: dict[str, dict[str, float | None]]
    auc_reference: dict


def _suite_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(TASKS_DIR.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


class EvalStage:
    def __init__(self, engine, spec: RunSpec, data, data_dir: Path, log, published_auc_retrain: float | None = None):
        self.engine, self.spec, self.data, self.data_dir, self.log = engine, spec, data, data_dir, log
        self.published_auc_retrain = published_auc_retrain
        self.settings = {"engine": engine.name, "engine_params": engine.params(), "engine_version": engine.version(),
                         "limit": spec.eval_limit, "dtype": spec.dtype, "suite": _suite_hash(),
                         "data": store.stable_hash(data.file_hashes()), "v": EVAL_CODE_VERSION}

    def measure_all(self, models, unlearned_dir: Path, quant, q_target: Path, q_unlearned: Path) -> Measured:
        by_model = {}
        if models.retrain_dir is not None:
            by_model["retrain"] = self.measure("retrain", models.retrain_dir, loader=self._load_full)
        by_model["target_pre"] = self.measure("target", models.target_dir, loader=self._load_full)
        by_model["target_post"] = self.measure(f"target/{quant.name}", q_target, loader=quant.load_quantized)
        by_model["pre"] = self.measure("unlearned", unlearned_dir, loader=self._load_full)
        by_model["post"] = self.measure(f"unlearned/{quant.name}", q_unlearned, loader=quant.load_quantized)
        if "retrain" in by_model:
            auc_ref = {"auc_retrain": by_model["retrain"]["privleak_auc"], "source": "retrain model evaluated"}
        elif self.published_auc_retrain is not None:
            auc_ref = {"auc_retrain": self.published_auc_retrain,
                       "source": f"published constant of task {self.spec.task.name} (no retrain model evaluated)"}
        else:
            auc_ref = {"auc_retrain": None, "source": "none: no retrain model and no published AUC_retrain"}
        from qubench.evaluation.metrics import privleak

        for metrics in by_model.values():
            auc = metrics.get("privleak_auc")
            ref = auc_ref["auc_retrain"]
            metrics["privleak"] = None if auc is None or ref is None else privleak(auc, ref)
        return Measured(by_model, auc_ref)

    def measure(self, label: str, model_dir: Path, loader) -> dict[str, float | None]:
        key = store.stable_hash({"model": model_fingerprint(model_dir), **self.settings})
        path = store.home() / "evals" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())["metrics"]
        self.log(f"evaluating {label} ...")
        from transformers import AutoTokenizer

        from qubench.evaluation.evaluate import evaluate_model

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with self.engine.session(model_dir, loader) as model:
            report = evaluate_model(self.engine, model, tokenizer, self.data, self.data_dir, auc_retrain=None,
                                    limit=self.spec.eval_limit)
        metrics = {k: v for k, v in report.metrics.items() if k != "privleak"}
        store.write_json_atomic(path, {"label": label, "model_dir": str(model_dir), "settings": self.settings,
                                       "metrics": metrics, "samples": report.samples})
        return metrics

    def _load_full(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, self.spec.dtype))
        return model.eval()
