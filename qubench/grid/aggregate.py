"""Per (task, method, quantizer): the mean over seeds with a 95% interval for every metric's values,
gap (and the target's own change) and, for forget metrics, both recoveries and a recovery verdict.
Utility, floor and raw metrics have no recovery: their verdict is "not applicable"; a forget metric on
which some seed's target does not remember the forget set measurably more than the retrain model
(qubench.scoring.separation) gets "target not separated".

Recoveries (the paper's and the damage-controlled one) get the hierarchical, paired bootstrap of
`qubench.grid.bootstrap` (seeds and probes resampled; meaningful with one seed too) whenever every seed
logged its per-probe scores; measurement fields, and recoveries of results without probe scores, get
the percentile bootstrap of the mean over seeds (no interval with one seed). Each estimate says which
method produced it. Everything is seeded, so the file is reproducible.

Verdicts come from the damage-controlled recovery's interval, against RECOVERY_MARGIN (a tenth of the
forgetting): "recovers" when the whole interval lies at or above it (quantization measurably undoes at
least a tenth), "does not recover" when the whole interval lies below it (at most a tenth, with 95%
confidence; quantization that deepens the forgetting is here too), "undetermined" when the interval
straddles it or there is none.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qubench import metric_catalog, results, store
from qubench.grid import bootstrap
from qubench.results import RunResult

#: 1.1: damage-controlled recovery and the method of every interval; target_change, the verdicts "not
#: applicable" (non-forget metrics) and "target not separated", and `not_separated`; 1.0 files still load.
AGGREGATE_SCHEMA_VERSION = "1.1"
FIELDS = ("pre", "post", "gap", "recovery", "target_pre", "target_post", "retrain", "retrain_post",
          "position_pre", "position_post", "controlled_recovery", "target_change")
Verdict = Literal["recovers", "does not recover", "undetermined", "not applicable", "target not separated"]
#: The share of the forgetting that counts as "recovered" for a verdict (see the module docstring).
RECOVERY_MARGIN = 0.10
SEED_BOOTSTRAP = "percentile bootstrap of the mean over seeds"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Estimate(Strict):
    mean: float
    ci_low: float | None    # None when no interval could be formed (e.g. one seed and no probe scores)
    ci_high: float | None
    n: int                  # seeds with a defined value
    method: str = SEED_BOOTSTRAP


class MetricAggregate(Strict):
    values: dict[str, Estimate | None]   # per FIELDS entry; None where no seed had a value
    recovery_verdict: Verdict            # from the damage-controlled recovery (module docstring)
    recovery_undefined: int = 0          # forget metric: seeds whose recovery was undefined (see recovery_note)
    controlled_undefined: int = 0        # likewise for the damage-controlled recovery
    #: forget metric: seeds whose target does not remember it measurably more than the retrain model
    #: (qubench.scoring.separation): their gap and recovery carry no information
    not_separated: int = 0


class RowAggregate(Strict):
    task: str
    method: str
    quant: str
    seeds: list[int]                     # seeds with an ok result
    missing_seeds: list[int] = Field(default_factory=list)  # no ok result (failed or not run)
    metrics: dict[str, MetricAggregate] = Field(default_factory=dict)


class Failure(Strict):
    cell: str
    stage: str
    type: str
    message: str
    result_file: str


class GridAggregate(Strict):
    schema_version: str = AGGREGATE_SCHEMA_VERSION
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    grid: dict[str, Any]
    confidence: float
    bootstrap_resamples: int
    bootstrap_seed: int
    method: str = (f"recoveries: {bootstrap.METHOD}, when every seed logged per-probe scores; other fields "
                   f"(and older results): {SEED_BOOTSTRAP}")
    recovery_margin: float = RECOVERY_MARGIN
    rows: list[RowAggregate]
    failures: list[Failure] = Field(default_factory=list)


def bootstrap_mean(values: list[float], confidence: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> Estimate:
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(mean=mean, ci_low=None, ci_high=None, n=len(x))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(mean=mean, ci_low=float(low), ci_high=float(high), n=len(x))


def verdict(recovery: Estimate | None) -> Verdict:
    if recovery is None or recovery.ci_low is None:
        return "undetermined"
    if recovery.ci_high < RECOVERY_MARGIN:
        return "does not recover"
    if recovery.ci_low >= RECOVERY_MARGIN:
        return "recovers"
    return "undetermined"


def metric_estimates(runs: list[RunResult], name: str, confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0, probe_resamples: int = 2000) -> dict[str, Estimate | None]:
    """Every FIELDS entry of metric `name` over the seeds `runs` (ok results of one setting)."""
    rows = [r.metrics[name] for r in runs if name in r.metrics]
    values: dict[str, Estimate | None] = {}
    for f in FIELDS:
        xs = [getattr(m, f) for m in rows if getattr(m, f) is not None]
        values[f] = bootstrap_mean(xs, confidence, resamples, seed) if xs else None
    defined = values["recovery"] is not None or values["controlled_recovery"] is not None
    seeds = _probe_seeds(runs, name) if defined else None  # no figure to put an interval on: skip the work
    if seeds is not None:
        floor = metric_catalog.get(name).min_forgetting
        for figure, interval in bootstrap.hierarchical_intervals(seeds, floor, confidence, probe_resamples,
                                                                 seed).items():
            if values.get(figure) is not None:
                values[figure] = values[figure].model_copy(update={
                    "ci_low": interval.low, "ci_high": interval.high,
                    "method": f"{bootstrap.METHOD}; defined in {interval.resamples} of {interval.of} resamples"})
    return values


def _probe_seeds(runs: list[RunResult], name: str) -> list[bootstrap.SeedProbes] | None:
    """Each seed's probe scores of `name`, or None unless every seed has them for every model."""
    metric = metric_catalog.BY_NAME.get(name)
    if metric is None or not runs or any(name not in r.probes for r in runs):
        return None
    seeds = []
    for r in runs:
        ref = (r.resolved.get("privleak_reference") or {}).get("auc_retrain") if metric.relative_to_retrain else None
        if metric.relative_to_retrain and not ref:
            return None
        probes = bootstrap.SeedProbes.from_result(r.probes[name], ref)
        if not set(bootstrap.MODELS) <= set(probes.scores):
            return None
        seeds.append(probes)
    return seeds


def aggregate(cells, results_dir: Path, grid: dict, confidence: float = 0.95, resamples: int = 10_000,
              seed: int = 0) -> GridAggregate:
    """Aggregate the stored results of `cells` (plan.Cell) over seeds."""
    by_row: dict[tuple[str, str, str], list] = defaultdict(list)
    failures = []
    for cell in cells:
        path = cell.result_file(results_dir)
        result, reason = results.read_stored(path)
        by_row[(cell.task, cell.method, cell.quant)].append((cell.seed, result))
        if result is None and path.exists():  # damaged: listed, and rerun by the next `qubench grid`
            failures.append(Failure(cell=cell.id, stage="result file", type="UnreadableResult",
                                    message=f"{reason}; run the grid again to recompute it", result_file=str(path)))
        if result is not None and result.status != "ok":
            err = result.error
            failures.append(Failure(cell=cell.id, stage=err.stage if err else "interrupted",
                                    type=err.type if err else "Interrupted",
                                    message=err.message if err else "the run was interrupted",
                                    result_file=str(path)))
    rows = []
    for (task, method, quant), seeded in by_row.items():
        ok = [(s, r) for s, r in seeded if r is not None and r.status == "ok"]
        row = RowAggregate(task=task, method=method, quant=quant, seeds=[s for s, _ in ok],
                           missing_seeds=[s for s, r in seeded if r is None or r.status != "ok"])
        names = list(dict.fromkeys(name for _, r in ok for name in r.metrics))
        for name in names:
            metric_rows = [r.metrics[name] for _, r in ok if name in r.metrics]
            runs = [r for _, r in ok if name in r.metrics]
            row.metrics[name] = _metric_aggregate(name, metric_estimates(runs, name, confidence, resamples, seed),
                                                  metric_rows, runs)
        rows.append(row)
    return GridAggregate(grid=grid, confidence=confidence, bootstrap_resamples=resamples, bootstrap_seed=seed,
                         rows=rows, failures=failures)


def _metric_aggregate(name: str, values: dict, metric_rows: list, runs: list) -> MetricAggregate:
    metric = metric_catalog.BY_NAME.get(name)
    if metric is None or metric.role != "forget":  # a utility metric has no forgetting to recover
        return MetricAggregate(values=values, recovery_verdict="not applicable")
    not_separated = sum(1 for r in runs if r.separation is not None
                        and (m := r.separation.of(name)) is not None and m.separated is False)
    return MetricAggregate(values=values,
                           recovery_verdict=("target not separated" if not_separated
                                             else verdict(values["controlled_recovery"])),
                           recovery_undefined=sum(m.recovery is None for m in metric_rows),
                           controlled_undefined=sum(m.controlled_recovery is None for m in metric_rows),
                           not_separated=not_separated)


def save(agg: GridAggregate, path: Path) -> None:
    store.write_json_atomic(path, json.loads(agg.model_dump_json()))


#: An aggregate holds a few numbers per (task, method, quantizer, metric): far below this even for big grids.
MAX_AGGREGATE_BYTES = 200_000_000


def load(path: Path) -> GridAggregate:
    """An aggregate file, read bounded (size, nesting) like every file qubench reads back; ValueError
    with the reason when it is not one."""
    from qubench import untrusted

    _, text = untrusted.read_json(Path(path), MAX_AGGREGATE_BYTES)
    return GridAggregate.model_validate_json(text)
