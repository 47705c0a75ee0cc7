"""Run a grid: plan, execute through an executor, prune, aggregate; resumable at any moment.

Resume needs no bookkeeping of its own: every cell's result and every stage artifact is written
atomically under a name derived from what determines it, so re-running the same grid reuses each
finished cell (`pipeline.run` returns a stored ok result untouched) and each finished stage, and
recomputes only what was cut short. Failed cells are retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qubench import results, store
from qubench.device import resolve as resolve_device
from qubench.errors import ConfigError
from qubench.grid import aggregate as agg
from qubench.grid.cache import KINDS
from qubench.grid.executors import make_executor
from qubench.grid.executors.base import CellOutcome, GroupJob
from qubench.grid.keep import Pruner
from qubench.grid.plan import Group, PlanCounts, all_cells, cells_dir, count, expand
from qubench.grid.spec import GridSpec

Log = Callable[[str], None]


@dataclass
class GridOptions:
    results_dir: Path
    executor: str = "local"
    workers: int = 1
    ray_address: str | None = None
    keep: str = "checkpoints"
    verbose: bool = True      # stage messages of every cell on stderr
    device: str = "auto"      # auto, cpu, cuda, cuda:N: where every cell runs (qubench.device)


@dataclass
class GridReport:
    results_dir: str
    aggregate_file: str
    cells: int
    outcomes: list[CellOutcome]
    plan: dict                                          # the dry-run counts at the start
    built: dict[str, int]                               # new cache entries per stage kind during this run
    stage_seconds: dict[str, float]                     # summed over the cells computed in this run
    seconds: float
    pruned: int = 0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    def as_dict(self) -> dict:
        return {"results_dir": self.results_dir, "aggregate_file": self.aggregate_file, "cells": self.cells,
                "ok": sum(o.status == "ok" for o in self.outcomes),
                "reused": sum(o.reused for o in self.outcomes), "failed": len(self.failed),
                "not_run": self.cells - len(self.outcomes), "interrupted": self.interrupted,
                "seconds": round(self.seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in
                                                                     self.stage_seconds.items()},
                "built": self.built, "pruned": self.pruned, "plan": self.plan, "notes": self.notes,
                "outcomes": [o.as_dict() for o in self.outcomes]}


def plan(spec: GridSpec, results_dir: Path, device: str = "auto") -> tuple[list[Group], PlanCounts]:
    spec.validate_plugins()
    groups = expand(spec)
    return groups, count(groups, Path(results_dir), resolve_device(device))


def _snapshot() -> dict[str, set[str]]:
    home = store.home()
    return {kind: {p.name for p in (home / kind).iterdir() if not p.name.startswith(".")}
            if (home / kind).is_dir() else set() for kind in KINDS}


def run_grid(spec: GridSpec, options: GridOptions, log: Log = lambda msg: None) -> GridReport:
    from qubench import preflight

    results_dir = Path(options.results_dir)
    groups, counts = plan(spec, results_dir, options.device)  # a GPU that is not there fails here
    preflight.writable_folder(results_dir, "results folder", preflight.MIN_FREE_RESULTS)
    preflight.writable_folder(store.home_path(), "QUBENCH_HOME", preflight.MIN_FREE_HOME)
    cells = all_cells(groups)
    out_dir = cells_dir(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with store.locked(results_dir / "grid", blocking=False) as got:
        if not got:
            raise ConfigError(f"another qubench grid is writing to {results_dir}; wait for it or use another --results")
        store.remove_stale_temporaries(out_dir)     # a result file cut short by a killed grid
        store.write_json_atomic(results_dir / "grid.json", {"spec": spec.model_dump(mode="json"),
                                                            "cells": [c.id for c in cells]})
        return _execute(spec, options, groups, counts, log)


def _execute(spec: GridSpec, options: GridOptions, groups: list[Group], counts: PlanCounts, log: Log) -> GridReport:
    results_dir = Path(options.results_dir)
    cells = all_cells(groups)
    by_group = {g.id: g for g in groups}
    jobs = [GroupJob(g.id, [(c.id, c.spec.model_dump(mode="json"), str(c.result_file(results_dir)))
                            for c in g.cells],
                     str(cells_dir(results_dir)), home=str(store.home()), verbose=options.verbose,
                     device=options.device, no_rebuild=store.no_rebuild())
            for g in groups]
    pruner = Pruner(options.keep, groups, options.device)
    outcomes: dict[str, CellOutcome] = {}

    def report(outcome: CellOutcome) -> None:
        outcomes[outcome.cell_id] = outcome
        what = "reused" if outcome.reused else outcome.status
        detail = f"  {outcome.error['stage']}: {outcome.error['type']}: {outcome.error['message']}" \
            if outcome.error else ""
        log(f"[{len(outcomes)}/{len(cells)}] {what:<6} {outcome.cell_id} ({outcome.seconds:.1f} s){detail}")

    before, t0, interrupted = _snapshot(), time.perf_counter(), False
    try:
        make_executor(options.executor, options.workers, options.ray_address).run(
            jobs, report, lambda job: pruner.group_done(by_group[job.group_id]))
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - t0
    after = _snapshot()
    aggregate_file = results_dir / "aggregate.json"
    agg.save(agg.aggregate(cells, results_dir, spec.model_dump(mode="json")), aggregate_file)
    report_ = GridReport(
        results_dir=str(results_dir), aggregate_file=str(aggregate_file), cells=len(cells),
        outcomes=[outcomes[c.id] for c in cells if c.id in outcomes], plan=counts.as_dict(),
        built={kind: len(after[kind] - before[kind]) for kind in KINDS},
        stage_seconds=_stage_seconds(outcomes.values()), seconds=seconds, pruned=len(pruner.pruned),
        interrupted=interrupted, notes=list(spec.notes))
    store.write_json_atomic(results_dir / "last_run.json", report_.as_dict())
    return report_


def _stage_seconds(outcomes) -> dict[str, float]:
    """Stage wall times summed over the cells this run computed (reused cells cost nothing)."""
    total: dict[str, float] = {}
    for o in outcomes:
        if o.reused or not Path(o.result_file).exists():
            continue
        result, _ = results.read_stored(Path(o.result_file))
        if result is None:
            continue
        for stage, secs in result.timings.items():
            total[stage] = total.get(stage, 0.0) + secs
    return total
