"""Stage 5: one model measured with the task's metrics by an engine — a JSON file of metrics and
per-probe samples, keyed by the model's content, the engine and its settings, the data and the
lm-eval suite actually read, so the target's measurements are shared by every method."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qubench import store
from qubench.device import CPU, Device
from qubench.fingerprint import model_fingerprint
from qubench.stages.base import Stage

# Bump when the evaluation code changes what it measures, so old measurements are not reused.
# 2: PrivLeak log-probs from unpadded equal-length batches (document scores move in the last bits).
EVAL_CODE_VERSION = 2


def suite_hash(folder: Path) -> str:
    """A hash of every file of the lm-eval task folder (YAMLs and their utils.py)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


@dataclass
class EvalSetup:
    """What every measurement of a run shares: the engine, the task data, the evaluation settings."""

    engine: Any
    data: Any                     # TaskData
    data_dir: Path
    limit: int | None
    dtype: str
    device: Device = CPU
    settings: dict = field(init=False)

    def __post_init__(self):
        from qubench.evaluation.evaluate import tasks_dir

        self.settings = {"engine": self.engine.name, "engine_params": self.engine.params(),
                         "engine_version": self.engine.version(), "limit": self.limit, "dtype": self.dtype,
                         "suite": suite_hash(tasks_dir()), "data": store.stable_hash(self.data.file_hashes()),
                         "v": EVAL_CODE_VERSION, **self.device.identity()}


class Evaluation(Stage):
    kind = "evals"
    description = "measurements of one model (metrics and per-probe samples)"
    step = "evaluate"
    group_shared = False
    is_file = True
    suffix = ".json"

    def __init__(self, setup: EvalSetup, model_dir: Path, label: str, loader: Callable[[Path], Any]):
        self.setup, self.model_dir, self.what, self.loader = setup, Path(model_dir), label, loader

    def identity(self) -> dict[str, Any]:
        return {"model": model_fingerprint(self.model_dir), **self.setup.settings}

    def activity(self) -> str:
        return f"evaluating {self.what}"

    def build(self, tmp: Path) -> None:
        from transformers import AutoTokenizer

        from qubench.evaluation.evaluate import evaluate_model

        s = self.setup
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        with s.engine.session(self.model_dir, self.loader) as model:
            report = evaluate_model(s.engine, model, tokenizer, s.data, s.data_dir, auc_retrain=None, limit=s.limit)
            ran = s.engine.run_record(model, tokenizer)
        # PrivLeak needs the retrain model's AUC, which is known only once every model is measured.
        metrics = {k: v for k, v in report.metrics.items() if k != "privleak"}
        with open(tmp, "w", encoding="utf-8") as fh:
            store.dump_json(fh, {"label": self.what, "model_dir": str(self.model_dir), "settings": s.settings,
                                 "ran": ran, "metrics": metrics, "samples": report.samples})

    def record(self) -> dict[str, Any]:
        """The measurement (metrics and per-probe samples), measured now if it is not cached yet."""
        record = store.read_json(self.get())
        store.read_json(self.path(), "metrics")  # a record without metrics is named, not a KeyError later
        return record

    def metrics(self) -> dict[str, float | None]:
        return self.record()["metrics"]
