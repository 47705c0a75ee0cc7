"""Per (task, method, quantizer): the mean over seeds with a bootstrap 95% interval for every
metric's values, gap and recovery, and a recovery verdict only where the interval excludes zero.

The interval is the percentile bootstrap of the mean over seeds (resampling seeds with
replacement, seeded, so the file is reproducible). With one seed there is no interval and every
verdict is "undetermined"; with few seeds the interval is crude but honest about it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qubench import results, store

AGGREGATE_SCHEMA_VERSION = "1.0"
FIELDS = ("pre", "post", "gap", "recovery", "target_pre", "target_post", "retrain")
Verdict = Literal["recovers", "does not recover", "undetermined"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Estimate(Strict):
    mean: float
    ci_low: float | None    # None with fewer than 2 seeds
    ci_high: float | None
    n: int                  # seeds with a defined value


class MetricAggregate(Strict):
    values: dict[str, Estimate | None]   # per FIELDS entry; None where no seed had a value
    recovery_verdict: Verdict
    recovery_undefined: int = 0          # seeds whose recovery was undefined (see their recovery_note)


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
    method: str = "percentile bootstrap of the mean over seeds"
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
    if recovery.ci_low > 0:
        return "recovers"
    if recovery.ci_high < 0:
        return "does not recover"
    return "undetermined"


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
            values = {}
            for f in FIELDS:
                xs = [getattr(m, f) for m in metric_rows if getattr(m, f) is not None]
                values[f] = bootstrap_mean(xs, confidence, resamples, seed) if xs else None
            row.metrics[name] = MetricAggregate(values=values, recovery_verdict=verdict(values["recovery"]),
                                                recovery_undefined=sum(m.recovery is None for m in metric_rows))
        rows.append(row)
    return GridAggregate(grid=grid, confidence=confidence, bootstrap_resamples=resamples, bootstrap_seed=seed,
                         rows=rows, failures=failures)


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
