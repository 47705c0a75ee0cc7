"""The typed result of one run: a versioned pydantic schema, written atomically."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench import metric_catalog, store
from qubench.specs import RunSpec

SCHEMA_VERSION = "1.0"

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


def metric_row(pre, post, target_pre=None, target_post=None, retrain=None,
               min_forgetting: float = 1.0) -> MetricRow:
    """The row of one metric; below `min_forgetting` (|target_pre - pre|, the metric's noise floor in its
    own units) recovery is a ratio of noise and is left undefined, with the reason."""
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


def catalogued_row(name: str, pre, post, target_pre=None, target_post=None, retrain=None) -> MetricRow:
    """`metric_row` with the noise floor the metric catalogue gives `name`."""
    return metric_row(pre, post, target_pre, target_post, retrain, metric_catalog.get(name).min_forgetting)


def save(result: RunResult, path: Path) -> None:
    store.write_json_atomic(path, json.loads(result.model_dump_json()))


def load(path: Path) -> RunResult:
    return RunResult.model_validate_json(Path(path).read_text(encoding="utf-8"))


def read_stored(path: Path) -> tuple[RunResult | None, str | None]:
    """(result, None) for a sound result file at `path`, else (None, why): read bounded and checked like
    any result file (`qubench.submissions.integrity.read_result`), so a damaged one never raises."""
    from qubench.submissions.integrity import read_result  # it builds on this module

    if not Path(path).exists() and not Path(path).is_symlink():
        return None, "no result file"
    result, _, reason = read_result(Path(path))
    return result, reason


def stored_ok(path: Path, spec: RunSpec | None = None) -> RunResult | None:
    """The result stored at `path` if it is there, sound, ok and (given `spec`) of that very spec; None
    otherwise (run it again)."""
    result, _ = read_stored(path)
    if result is None or result.status != "ok":
        return None
    # read_result checked that run_id is the hash of the stored spec: equal run_ids, equal specs
    return result if spec is None or result.run_id == spec.run_id() else None
