"""The typed result of one run: a versioned pydantic schema, written atomically."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench import metric_catalog, store
from qubench.specs import RunSpec

# 1.1: the quantized retrain model, damage-controlled recovery and per-probe scores (1.0 files still load).
SCHEMA_VERSION = "1.1"


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
    retrain_post: float | None = None           # the retrain model quantized by the same quantizer
    # Damage-controlled recovery (qubench.recovery): positions between retrain (0) and target (1) at equal
    # precision, and the share of the remaining distance to the target that quantization takes back.
    position_pre: float | None = None
    position_post: float | None = None
    controlled_recovery: float | None = None
    controlled_recovery_note: str | None = None


class Diagnostics(Strict):
    mean_abs_delta: float | None = None        # mean |w_unlearned - w_target| over quantized weights
    max_abs_delta: float | None = None
    mean_quant_step: float | None = None       # mean quantization step of the scheme on the target
    delta_over_step: float | None = None
    quantized_disagreement: float | None = None  # share of quantized weights that differ (q(target) vs q(unlearned))
    extra: dict[str, Any] = Field(default_factory=dict)


class ProbeScores(Strict):
    """Per-probe scores of one forget metric for every model of the run (label -> scores, the same probes
    in the same order), so intervals can resample probes paired across models (qubench.grid.bootstrap).
    statistic "mean": the metric is `scale` x the mean of `scores`; "auc": the metric follows from the
    ROC AUC of the `scores` (PrivLeak forget documents' Min-K scores) against `holdout`'s."""

    statistic: Literal["mean", "auc"]
    scale: float = 100.0
    scores: dict[str, list[float]]
    holdout: dict[str, list[float]] = Field(default_factory=dict)


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
    probes: dict[str, ProbeScores] = Field(default_factory=dict)  # forget metrics' per-probe scores
    error: ErrorInfo | None = None


def metric_row(pre, post, target_pre=None, target_post=None, retrain=None,
               min_forgetting: float = 1.0, retrain_post=None) -> MetricRow:
    """The row of one metric; below `min_forgetting` (|target_pre - pre|, the metric's noise floor in its
    own units) recovery is a ratio of noise and is left undefined, with the reason."""
    controlled = _controlled(pre, post, target_pre, target_post, retrain, retrain_post, min_forgetting)
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
                     target_pre=target_pre, target_post=target_post, retrain=retrain, **controlled)


def _controlled(pre, post, target_pre, target_post, retrain, retrain_post, floor: float) -> dict[str, Any]:
    from qubench import recovery

    values = (pre, post, target_pre, target_post, retrain, retrain_post)
    note = recovery.controlled_note(*values, floor)
    out = {"retrain_post": retrain_post, "controlled_recovery_note": note}
    if retrain is not None and retrain_post is not None and None not in values[:4]:
        out["position_pre"] = _finite(recovery.position(pre, retrain, target_pre, floor))
        out["position_post"] = _finite(recovery.position(post, retrain_post, target_post, floor))
    if note is None:
        out["controlled_recovery"] = _finite(recovery.controlled_recovery(*values, floor))
    return out


def _finite(value) -> float | None:
    value = float(value)
    return value if value == value else None  # NaN: undefined


def catalogued_row(name: str, pre, post, target_pre=None, target_post=None, retrain=None,
                   retrain_post=None) -> MetricRow:
    """`metric_row` with the noise floor the metric catalogue gives `name`."""
    return metric_row(pre, post, target_pre, target_post, retrain, metric_catalog.get(name).min_forgetting,
                      retrain_post)


def save(result: RunResult, path: Path) -> None:
    store.write_json_atomic(path, json.loads(result.model_dump_json()))


def load(path: Path) -> RunResult:
    return RunResult.model_validate_json(Path(path).read_text(encoding="utf-8"))


def stored_ok(path: Path) -> RunResult | None:
    """The result stored at `path` if it is there, readable and ok; None otherwise (run it again)."""
    try:
        result = load(path) if Path(path).exists() else None
    except (ValueError, OSError):
        return None
    return result if result is not None and result.status == "ok" else None
