"""The typed result of one run: a versioned pydantic schema, written atomically."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qubench import metric_catalog, store
from qubench.specs import RunSpec

#: 1.1: the quantized retrain model, damage-controlled recovery and per-probe scores of forget metrics;
#: metrics whose catalogue role is not `forget` (utility, floor, raw) get their change under quantization
#: and no recovery (a utility metric has no forgetting to recover); every row gains `target_change`; ok
#: results gain `separation`. Files of schema 1.0 still load: see `RunResult._upgrade`.
SCHEMA_VERSION = "1.1"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricRow(Strict):
    """One metric across the models of a run. `pre`/`post` are the unlearned model before/after quantization.

    `gap` is the unlearned model's change under quantization and `target_change` the target's own; for a
    forget metric the gap is the forgetting quantization undoes and `recovery` its share of what unlearning
    removed. Metrics of any other role have no recovery (None, with the reason in `recovery_note`)."""

    pre: float | None
    post: float | None
    gap: float | None                 # post - pre
    recovery: float | None            # (post - pre) / (target_pre - pre); forget metrics only
    recovery_note: str | None = None  # why recovery is undefined or does not apply, when it is
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
    target_change: float | None = None  # target_post - target_pre: the target's own change under quantization


class MetricSeparation(Strict):
    """Whether the target remembers one forget metric measurably more than a model that never saw the
    forget set: the retrain model, or (without one) the target itself on never-trained probes."""

    metric: str
    view: str
    target: float | None
    reference: float | None
    #: retrain: the retrain model's value of `metric`; floor: the target's value of the floor metric
    #: (`reference_metric`, the same kind of probe on never-trained data)
    reference_kind: Literal["retrain", "floor"] | None
    reference_metric: str | None
    margin: float | None              # (target - reference) in the direction of memorisation
    threshold: float                  # the least margin that counts as measurable (per view)
    separated: bool | None            # None: nothing to compare the target with


class Separation(Strict):
    """Can this run's numbers show forgetting at all? Only if its target remembers the forget set
    measurably more than a model that never saw it (`qubench.scoring.separation`)."""

    #: separated: every checked metric; partly separated: some; not separated: none (the run cannot show
    #: forgetting or recovery); unchecked: nothing to compare the target with.
    status: Literal["separated", "partly separated", "not separated", "unchecked"]
    metrics: list[MetricSeparation] = Field(default_factory=list)
    message: str

    def of(self, metric: str) -> MetricSeparation | None:
        return next((m for m in self.metrics if m.metric == metric), None)


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
    #: Whether the target remembers the forget set measurably more than the retrain model (ok results).
    separation: Separation | None = None

    @model_validator(mode="after")
    def _upgrade(self) -> "RunResult":
        """Files of schema 1.0 load as 1.1: rows of non-forget metrics lose the recovery they carried (it
        never meant anything) and every row gets its target_change. Only fields 1.0 did not have are
        derived, so a stored gap or forget recovery is still checked against its numbers
        (`qubench.submissions.integrity`). Any ok result without a separation gets it from its rows'
        target and retrain values, the very numbers the pipeline derives it from."""
        if self.schema_version == "1.0":
            for name, row in self.metrics.items():
                if row.target_pre is not None and row.target_post is not None:
                    row.target_change = row.target_post - row.target_pre
                metric = metric_catalog.BY_NAME.get(name)
                if metric is not None and metric.role != "forget":
                    row.recovery, row.recovery_note = None, no_recovery_note(metric.role)
            self.schema_version = SCHEMA_VERSION
        if self.status == "ok" and self.separation is None and self.metrics:
            from qubench.scoring import separation_from_rows  # scoring imports this module

            self.separation = separation_from_rows(self.metrics)
        return self


def no_recovery_note(role: str) -> str:
    return (f"not applicable: a {role} metric has no forgetting to recover; its change under quantization is "
            "gap (post - pre), the target's own is target_change")


def metric_row(pre, post, target_pre=None, target_post=None, retrain=None,
               min_forgetting: float = 1.0, role: metric_catalog.Role = "forget", retrain_post=None) -> MetricRow:
    """The row of one metric; below `min_forgetting` (|target_pre - pre|, the metric's noise floor in its
    own units) recovery is a ratio of noise and is left undefined, with the reason. Only forget metrics
    have recoveries (the paper's and the damage-controlled one): the others report their change under
    quantization (gap, target_change) alone."""
    controlled = _controlled(pre, post, target_pre, target_post, retrain, retrain_post, min_forgetting, role)
    gap = None if pre is None or post is None else post - pre
    target_change = None if target_pre is None or target_post is None else target_post - target_pre
    recovery, note = None, None
    if role != "forget":
        note = no_recovery_note(role)
    elif gap is not None and target_pre is not None:
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
                     target_pre=target_pre, target_post=target_post, retrain=retrain, target_change=target_change,
                     **controlled)


def _controlled(pre, post, target_pre, target_post, retrain, retrain_post, floor: float,
                role: str = "forget") -> dict[str, Any]:
    from qubench import recovery

    values = (pre, post, target_pre, target_post, retrain, retrain_post)
    note = recovery.controlled_note(*values, floor) if role == "forget" else no_recovery_note(role)
    out = {"retrain_post": retrain_post, "controlled_recovery_note": note}
    if role == "forget" and retrain is not None and retrain_post is not None and None not in values[:4]:
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
    """`metric_row` with the role and noise floor the metric catalogue gives `name`."""
    metric = metric_catalog.get(name)
    return metric_row(pre, post, target_pre, target_post, retrain, metric.min_forgetting, metric.role,
                      retrain_post)


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
