"""The typed result of one run: a versioned pydantic schema, written atomically."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench import store
from qubench.specs import RunSpec

SCHEMA_VERSION = "1.0"

#: The metrics every MUSE-style run reports, in display order, with one-line meanings.
METRIC_HELP = {
    "verbmem_f": "VerbMem on forget: ROUGE-L F1 x100 of the greedy continuation of forget text (lower = forgotten)",
    "knowmem_f": "KnowMem on forget: ROUGE-L F1 x100 of answers to questions about forget facts (lower = forgotten)",
    "privleak": "PrivLeak: (AUC - AUC_retrain)/AUC_retrain x100, Min-40% forget vs holdout (0 = like retrain, "
                "strongly negative = forget set still detectable)",
    "knowmem_r": "KnowMem on retain: ROUGE-L F1 x100 on retain facts (utility; higher = better)",
    "verbmem_r": "VerbMem on retain: ROUGE-L F1 x100 on retain text (utility the model should keep; higher = better)",
    "verbmem_holdout": "VerbMem on never-trained holdout text: what a model guesses without memorising (floor)",
    "privleak_auc": "Raw Min-40% AUC, forget (non-member) vs holdout (member)",
    # The classification view (tasks with classify/ data, e.g. twitter-misinfo): label accuracy x100.
    "cls_f": "Label accuracy x100 on forget posts (trained on; lower = forgotten, down to cls_holdout)",
    "cls_holdout": "Label accuracy x100 on never-trained posts of the forget class (the floor forgetting should reach)",
    "cls_r": "Label accuracy x100 on retain posts (trained on; the model should keep it)",
    "cls_test": "Label accuracy x100 on a balanced never-trained test split (classification utility)",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricRow(Strict):
    """One metric across the models of a run. `pre`/`post` are the unlearned model before/after quantization."""

    pre: float | None
    post: float | None
    gap: float | None                 # post - pre
    recovery: float | None            # (post - pre) / (target_pre - pre)
    recovery_note: str | None = None  # why recovery is undefined, when it is
    target_pre: float | None = None
    target_post: float | None = None
    retrain: float | None = None


class Diagnostics(Strict):
    mean_abs_delta: float | None = None        # mean |w_unlearned - w_target| over quantized weights
    max_abs_delta: float | None = None
    mean_quant_step: float | None = None       # mean quantization step of the scheme on the target
    delta_over_step: float | None = None
    quantized_disagreement: float | None = None  # share of quantized weights that differ (q(target) vs q(unlearned))
    extra: dict[str, Any] = Field(default_factory=dict)


class ErrorInfo(Strict):
    stage: str
    type: str
    message: str
    traceback: str


class RunResult(Strict):
    schema_version: str = SCHEMA_VERSION
    run_id: str
    status: Literal["ok", "failed"]
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    spec: RunSpec
    resolved: dict[str, Any] = Field(default_factory=dict)  # every parameter with defaults, quant scheme, model ids/hashes
    metrics: dict[str, MetricRow] = Field(default_factory=dict)
    diagnostics: Diagnostics = Field(default_factory=Diagnostics)
    timings: dict[str, float] = Field(default_factory=dict)
    unlearning: dict[str, Any] = Field(default_factory=dict)  # steps and final losses
    environment: dict[str, Any] = Field(default_factory=dict)
    data_hashes: dict[str, str] = Field(default_factory=dict)
    error: ErrorInfo | None = None


#: Below this much forgetting (in the metric's own units) recovery is a ratio of noise and is not
#: reported: one point on the 0-100 scales, 0.01 of AUC.
MIN_FORGETTING = {"privleak_auc": 0.01}
DEFAULT_MIN_FORGETTING = 1.0


def metric_row(pre, post, target_pre=None, target_post=None, retrain=None,
               min_forgetting: float = DEFAULT_MIN_FORGETTING) -> MetricRow:
    gap = None if pre is None or post is None else post - pre
    recovery, note = None, None
    if gap is not None and target_pre is not None:
        forgotten = target_pre - pre
        if forgotten == 0:
            note = "undefined: unlearning changed nothing on this metric (target_pre == pre)"
        elif abs(forgotten) < min_forgetting:
            note = f"undefined: |target_pre - pre| = {abs(forgotten):.3g} is below {min_forgetting:g}, too little forgetting for a ratio"
        else:
            recovery = gap / forgotten
    elif gap is not None:
        note = "undefined: no target measurement"
    return MetricRow(pre=pre, post=post, gap=gap, recovery=recovery, recovery_note=note,
                     target_pre=target_pre, target_post=target_post, retrain=retrain)


def save(result: RunResult, path: Path) -> None:
    store.write_json_atomic(path, json.loads(result.model_dump_json()))


def load(path: Path) -> RunResult:
    return RunResult.model_validate_json(Path(path).read_text(encoding="utf-8"))
