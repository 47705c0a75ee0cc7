"""One leaderboard row per (source, run spec without the seed): the mean over seeds with the grid's
intervals (qubench.grid.aggregate.metric_estimates, so the numbers match `aggregate.json`): recoveries
by the hierarchical, paired bootstrap over seeds and probes, measurements by the bootstrap over seeds."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qubench import metric_catalog, store
from qubench.grid.aggregate import FIELDS, metric_estimates, verdict
from qubench.leaderboard.data import Board, Run, Source
from qubench.results import RunResult

BASELINE_METHODS = ("target", "retrain")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stat(Strict):
    mean: float | None = None
    low: float | None = None    # bootstrap interval over seeds; None with one seed
    high: float | None = None
    n: int = 0


class MetricStats(Strict):
    name: str
    values: dict[str, Stat]     # per FIELDS entry
    verdict: str = "undetermined"  # from the damage-controlled recovery's interval (grid.aggregate.verdict)

    def mean(self, field: str) -> float | None:
        return self.values[field].mean


class Row(Strict):
    key: str
    source: str
    badge: str
    verified: bool
    task: str                   # name, with its parameters when there are any
    method: str
    composition: str
    plugin: str                 # distribution and version of the method
    quantizer: str
    quant_family: str | None
    bits: float | None
    group_size: int | None
    quant_library: str | None
    model: str
    engine: str
    evaluation: str             # dtype, batch size, probe limit
    setting: str                # hash of what must be equal for rows to be compared (all but method, seed)
    seeds: list[int]
    date: datetime
    forget: MetricStats | None
    forget2: MetricStats | None
    utility: MetricStats | None
    runs: list[str]             # Run keys, one per seed
    baseline: bool
    control: bool = False       # a known-answer control (e.g. +inbucket): shown, labelled, never ranked
    audited: bool = False       # a checkpoint audited with `qubench audit`, not submitted: listed apart, never ranked
    #: Whether every seed's target remembers the forget metric measurably more than the retrain model
    #: (qubench.scoring.separation): False rows cannot show forgetting and are not ranked; None: unchecked.
    separated: bool | None = None
    separation: str = ""
    rank: int | None = None
    standing: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


def build_rows(board: Board) -> list[Row]:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in board.runs:
        spec = run.result.spec.model_dump(mode="json")
        spec.pop("seed")
        groups[(run.source, store.stable_hash(spec))].append(run)
    rows = []
    for (source_name, _), runs in groups.items():
        runs.sort(key=lambda r: r.result.spec.seed)
        rows.append(_row(board.source(source_name), runs))
    return rows


def _label(name: str, params: dict) -> str:
    if not params:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def _stats(runs: list[Run], metric: str | None) -> MetricStats | None:
    if metric is None or not any(metric in r.result.metrics for r in runs):
        return None
    estimates = metric_estimates([r.result for r in runs], metric)
    values = {field: Stat() if est is None else Stat(mean=est.mean, low=est.ci_low, high=est.ci_high, n=est.n)
              for field, est in estimates.items()}
    controlled = estimates.get("controlled_recovery")
    return MetricStats(name=metric, values=values, verdict=verdict(controlled))


def _badge(runs: list[Run]) -> tuple[str, bool]:
    """A row's badge from its cells' own: verified only when every seed's cell is, else it says how many are."""
    badges = {r.badge for r in runs}
    if len(badges) == 1:
        return runs[0].badge, runs[0].verified
    verified = sum(r.badge == "verified" for r in runs)
    return f"submitted ({verified} of {len(runs)} cells verified)", False


@lru_cache(maxsize=1)
def builtin_methods() -> frozenset[str]:
    """qubench's own method names, read from its distribution metadata (no plugin is imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return frozenset(ep.name for ep in distribution("qubench").entry_points if ep.group == "qubench.methods")
    except PackageNotFoundError:
        return frozenset()


def _plugin(source: Source, result: RunResult) -> str:
    base = result.spec.method.name.split("+")[0]
    if source.kind == "submission" and source.package:
        return f"{source.package} {source.version}"
    if result.spec.audit is not None:
        return "external checkpoint (audited)"
    recorded = (result.environment.get("plugins") or {}).get("method")
    if isinstance(recorded, str) and recorded:
        return recorded
    if base in builtin_methods():
        version = (result.environment.get("libraries") or {}).get("qubench")
        return f"qubench {version}" if version else "qubench"
    return "not recorded"


def _composition(result: RunResult) -> str:
    comp = (result.resolved.get("method") or {}).get("params", {}).get("composition")
    if isinstance(comp, dict) and comp.get("base"):
        mods = comp.get("modifiers") or []
        return " + ".join([str(comp["base"]), *map(str, mods)])
    return ""


def _number(value) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) else None


def _row(source: Source, runs: list[Run]) -> Row:
    first = runs[0].result
    spec, resolved = first.spec, first.resolved
    scheme = (resolved.get("quant") or {}).get("scheme") or {}
    library = scheme.get("library")
    if library and scheme.get("library_version"):
        library = f"{library} {scheme['library_version']}"
    engine = resolved.get("engine") or {}
    names = {n for r in runs for n in r.result.metrics}
    view = next((h for h in metric_catalog.HEADLINES if h.forget in names), None)
    declared = ((resolved.get("task") or {}).get("utility_metric"))
    if view is not None and view.utility != "cls_test" and declared in names:
        view = replace(view, utility=declared)  # the task's own choice (Task.utility_metric)
    target = ((resolved.get("models") or {}).get("target") or {})
    model = spec.model or f"task's own target ({target.get('fingerprint', '?')})"
    group_size = scheme.get("group_size", scheme.get("block_size"))
    setting = spec.model_dump(mode="json")
    for key in ("seed", "method", "audit"):  # an audited checkpoint is compared with methods in its setting
        setting.pop(key, None)
    badge, verified = _badge(runs)
    return Row(
        key=f"{source.name}/{store.stable_hash([r.key for r in runs])}",
        source=source.name, badge=badge, verified=verified,
        task=_label(spec.task.name, spec.task.params), method=spec.method.name,
        composition=_composition(first), plugin=_plugin(source, first),
        quantizer=_label(spec.quant.name, spec.quant.params), quant_family=scheme.get("family"),
        bits=_number(scheme.get("bits")), group_size=group_size if isinstance(group_size, int) else None,
        quant_library=library, model=model,
        engine=f"{spec.engine.name} ({engine['version']})" if engine.get("version") else spec.engine.name,
        evaluation=", ".join([spec.dtype, f"batch {spec.batch_size}"]
                             + ([f"first {spec.eval_limit} probes"] if spec.eval_limit else [])),
        setting=store.stable_hash(setting), seeds=[r.result.spec.seed for r in runs],
        date=max(r.result.created for r in runs),
        forget=_stats(runs, view.forget if view else None), forget2=_stats(runs, view.forget2 if view else None),
        utility=_stats(runs, view.utility if view else None), runs=[r.key for r in runs],
        baseline=spec.method.name in BASELINE_METHODS,
        control=bool((resolved.get("method") or {}).get("control")),
        # An audit is shown apart from the plugin methods unless its authors submitted it.
        audited=spec.audit is not None and source.kind != "submission",
        **_separation(runs, view.forget if view else None),
    )


def _separation(runs: list[Run], metric: str | None) -> dict:
    """The row's separation on its forget metric, over its seeds (each seed trains its own target)."""
    if metric is None:
        return {"separated": None, "separation": "unchecked: no forget metric"}
    checks = [(r.result.spec.seed, r.result.separation.of(metric) if r.result.separation else None) for r in runs]
    failing = [(seed, c) for seed, c in checks if c is not None and c.separated is False]
    if failing:
        seed, c = failing[0]
        ref = "retrain" if c.reference_kind == "retrain" else (c.reference_metric or "floor")
        seeds = ", ".join(str(s) for s, _ in failing)
        return {"separated": False, "separation": (
            f"NOT separated: target {metric} {c.target:.1f} vs {ref} {c.reference:.1f} (< {c.threshold:g} points "
            f"apart; seed{'s' if len(failing) > 1 else ''} {seeds}): cannot show forgetting")}
    if checks and all(c is not None and c.separated for _, c in checks):
        c = checks[0][1]
        ref = "retrain" if c.reference_kind == "retrain" else c.reference_metric
        return {"separated": True, "separation": (
            f"separated: target {metric} {c.target:.1f} vs {ref} {c.reference:.1f}"
            + (f" (seed {checks[0][0]}; all {len(checks)} seeds separate)" if len(checks) > 1 else ""))}
    return {"separated": None, "separation": f"unchecked: nothing to compare the target's {metric} with"}
