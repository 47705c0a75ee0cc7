"""Expand a grid into cells, order them for stage sharing, and count what a run would compute.

A cell is one `qubench run`: (task, method, quantizer, seed). Cells that share an unlearned model
(same task, seed and method) form a group and run back to back in one worker, so the model is
trained once and feeds every quantizer while it is hot in the cache; the target's stages are
shared through the stage cache by every group of the same (task, seed).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from qubench import pipeline, registry, results
from qubench.device import CPU, Device
from qubench.device import resolve as resolve_device
from qubench.stages import TrainedModels
from qubench.stages.run import Plugins, RunStages
from qubench.grid.spec import GridSpec
from qubench.specs import RunSpec


@dataclass(frozen=True)
class Cell:
    task: str     # entry labels
    method: str
    quant: str
    seed: int
    spec: RunSpec

    @property
    def id(self) -> str:
        return f"{self.task}/{self.method}/{self.quant}/s{self.seed}"

    def result_file(self, results_dir: Path) -> Path:
        return pipeline.result_path(cells_dir(results_dir), self.spec)


@dataclass(frozen=True)
class Group:
    """Cells sharing one unlearned model: run together, in this order."""

    task: str
    seed: int
    method: str
    cells: tuple[Cell, ...]

    @property
    def id(self) -> str:
        return f"{self.task}/{self.method}/s{self.seed}"


def cells_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "cells"


def expand(grid: GridSpec) -> list[Group]:
    """Groups in run order: task, then seed (one target at a time), then method; quantizers inside.
    Audited checkpoints are groups of the first seed (an audit unlearns nothing a seed could vary)."""
    groups = []
    for task in grid.tasks:
        for seed in grid.seeds:
            for method in grid.methods:
                cells = tuple(Cell(task.id, method.id, quant.id, seed, grid.run_spec(task, method, quant, seed))
                              for quant in grid.quantizers)
                groups.append(Group(task.id, seed, method.id, cells))
            for audit in grid.audits if seed == grid.seeds[0] else ():
                cells = tuple(Cell(task.id, audit.id, quant.id, seed, grid.audit_spec(task, audit, quant))
                              for quant in grid.quantizers)
                groups.append(Group(task.id, seed, audit.id, cells))
    return groups


def all_cells(groups: list[Group]) -> list[Cell]:
    return [cell for group in groups for cell in group.cells]


def stored_status(cell: Cell, results_dir: Path) -> str | None:
    """"ok" or "failed" (or unreadable: run it again) for a stored result of the cell's exact spec,
    None if there is none."""
    path = cell.result_file(results_dir)
    if not path.exists():
        return None
    return "ok" if results.stored_ok(path, cell.spec) is not None else "failed"


# --- dry-run counts -------------------------------------------------------------------------------

#: Rows of the dry-run table: the stage kinds a cell needs, in pipeline order.
STAGES = {"tasks": "task data", "models": "target/retrain models", "unlearned": "unlearned models",
          "external": "audited checkpoints (existing)", "merged": "merged LoRA adapters (audits)",
          "quantized": "quantized checkpoints", "evals": "evaluations"}

#: Rows only audits need (shown only when a grid has audits).
AUDIT_KINDS = ("external", "merged")


@dataclass
class StageCount:
    stage: str
    needed: int = 0
    cached: int = 0

    @property
    def to_run(self) -> int:
        return self.needed - self.cached


@dataclass
class PlanCounts:
    cells: int = 0
    cells_done: int = 0          # an ok result is stored: never run again
    cells_failed_before: int = 0  # a failed result is stored: run again
    stages: dict[str, StageCount] = field(
        default_factory=lambda: OrderedDict((s, StageCount(s)) for s in STAGES.values()))
    exact: bool = True           # False when upstream stages are missing, so downstream keys are estimates

    def as_dict(self) -> dict:
        return {"cells": self.cells, "cells_done": self.cells_done, "cells_failed_before": self.cells_failed_before,
                "cells_to_run": self.cells - self.cells_done, "exact": self.exact,
                "stages": {s.stage: {"needed": s.needed, "cached": s.cached, "to_run": s.to_run}
                           for s in self.stages.values()}}


@dataclass(frozen=True)
class Need:
    """One artifact a cell needs: its path, or a symbolic stand-in while an input is not built yet
    (content-keyed stages can only be named once their inputs exist)."""

    kind: str
    key: object
    exists: bool
    symbolic: bool = False


class StageWalker:
    """Names the stages of cells' specs on `device` as far as their inputs exist (never building
    anything), with plugins and task data loaded once for the whole grid. Shared by the planner and
    the pruner. The device matters: GPU stages carry the device kind in their keys."""

    def __init__(self, device: str | Device = CPU):
        self.device = resolve_device(device)
        self._plugins: dict[str, object] = {}
        self._data: dict[Path, object] = {}

    def _create(self, family: str, name: str, params: dict):
        k = json.dumps([family, name, params], sort_keys=True, default=str)
        if k not in self._plugins:
            self._plugins[k] = registry.create(family, name, params)
        return self._plugins[k]

    def stages(self, spec: RunSpec) -> RunStages:
        return RunStages(spec, Plugins.from_spec(spec, create=self._create, device=self.device), device=self.device)

    def _load(self, data_dir: Path):
        if data_dir not in self._data:
            from qubench.tasks import muse_layout

            self._data[data_dir] = muse_layout.load(data_dir)
        return self._data[data_dir]

    def walk(self, spec: RunSpec) -> dict[str, Need]:
        """The cell's artifacts by role: data, models, unlearned, q_target, q_unlearned, and one
        eval:<label> per measurement."""
        st = self.stages(spec)
        task_stage = st.task_data()
        data = self._load(task_stage.path()) if task_stage.exists() else None
        needs = {"data": Need("tasks", task_stage.path(), data is not None)}

        models_stage = st.models(data)
        models = None
        if isinstance(models_stage, TrainedModels) and data is None:
            models_key = ("models", spec.task.name, json.dumps(spec.task.params, sort_keys=True), spec.seed)
            needs["models"] = Need("models", models_key, False, symbolic=True)
        elif isinstance(models_stage, TrainedModels):
            models_key = models_stage.path()
            needs["models"] = Need("models", models_key, models_stage.exists())
            models = models_stage.prepared() if models_stage.exists() else None
        else:
            models_key = ("models", models_stage.target_ref, models_stage.retrain_ref)
            models = models_stage.prepared()
            needs["models"] = Need("models", models_key, models is not None)
        has_retrain = isinstance(models_stage, TrainedModels) or models_stage.retrain_ref is not None

        quant = st.plugins.quant
        quant_key = (quant.name, json.dumps(quant.params(), sort_keys=True))
        method_key = ("unlearned", models_key, spec.method.name, json.dumps(spec.method.params, sort_keys=True),
                      spec.seed)
        ready = models is not None and data is not None
        if spec.audit is not None:  # an existing checkpoint (never pruned), or an adapter merged here
            needs["unlearned"] = _audited(st.unlearned(models, data), method_key)
        else:
            unlearned = st.unlearned(models, data) if ready else None
            needs["unlearned"] = (Need("unlearned", unlearned.path(), unlearned.exists()) if unlearned is not None
                                  else Need("unlearned", method_key, False, symbolic=True))
        unlearned_dir = needs["unlearned"].key if needs["unlearned"].exists else None
        q_target = st.quantized(models.target_dir, data) if ready else None
        needs["q_target"] = (Need("quantized", q_target.path(), q_target.exists()) if q_target is not None
                             else Need("quantized", ("quantized", models_key, quant_key), False, symbolic=True))
        q_retrain = st.quantized(models.retrain_dir, data) if ready and models.retrain_dir is not None else None
        if has_retrain:
            needs["q_retrain"] = (Need("quantized", q_retrain.path(), q_retrain.exists()) if q_retrain is not None
                                  else Need("quantized", ("quantized", ("retrain", models_key), quant_key), False,
                                            symbolic=True))
        q_unlearned = st.quantized(unlearned_dir, data) if ready and unlearned_dir is not None else None
        needs["q_unlearned"] = (Need("quantized", q_unlearned.path(), q_unlearned.exists()) if q_unlearned
                                else Need("quantized", ("quantized", method_key, quant_key), False, symbolic=True))

        existing = lambda need: need.key if need.exists and not need.symbolic else None
        setup = st.eval_setup(data, task_stage.path()) if data is not None else None
        symbols = {"retrain": ("retrain", models_key), "retrain_post": ("retrain/q", models_key, quant_key),
                   "target_pre": ("target", models_key),
                   "target_post": ("target/q", models_key, quant_key), "pre": method_key,
                   "post": (method_key, quant_key)}
        found = {}
        if setup is not None and models is not None:
            found = st.evaluations(setup, models, unlearned_dir, existing(needs["q_target"]),
                                   existing(needs["q_unlearned"]),
                                   existing(needs["q_retrain"]) if "q_retrain" in needs else None)
        settings = (st.plugins.engine.name, json.dumps(st.plugins.engine.params(), sort_keys=True), spec.eval_limit,
                    spec.dtype, self.device.kind)
        for label, symbol in symbols.items():
            if label.startswith("retrain") and not has_retrain:
                continue
            if label in found:
                needs[f"eval:{label}"] = Need("evals", found[label].path(), found[label].exists())
            else:
                needs[f"eval:{label}"] = Need("evals", ("eval", symbol, settings), False, symbolic=True)
        return needs


def _audited(source, method_key) -> Need:
    """What an audit cell needs in place of an unlearned model: the checkpoint itself (kind `external`,
    here or still to download), or for a LoRA adapter its merge onto the target (kind `merged`)."""
    found = source.local()
    if found is None:
        return Need("external", ("external", source.audit.unlearned), False, symbolic=True)
    if not found.is_adapter:
        return Need("external", found.path, True)
    if source.models is None:
        return Need("merged", ("merged", method_key), False, symbolic=True)
    merged = source.merged(found.path)
    return Need("merged", merged.path(), merged.exists())


def count(groups: list[Group], results_dir: Path, device: str | Device = CPU) -> PlanCounts:
    """How many cells and stage artifacts the grid needs, and how many of each are already cached.

    Only cells without a stored ok result count: their stages are what a run would compute. Where
    an upstream artifact does not exist yet its downstream keys are estimated (`exact` is False):
    e.g. the `target` method's model is the target itself, which is only known once it exists."""
    counts = PlanCounts()
    walker = StageWalker(device)
    found: dict[str, dict[object, bool]] = {kind: {} for kind in STAGES}
    for cell in all_cells(groups):
        counts.cells += 1
        status = stored_status(cell, results_dir)
        if status == "ok":
            counts.cells_done += 1
            continue
        counts.cells_failed_before += status == "failed"
        for need in walker.walk(cell.spec).values():
            found[need.kind][need.key] = found[need.kind].get(need.key, False) or need.exists
            counts.exact &= not need.symbolic
    for kind, keys in found.items():
        if kind in AUDIT_KINDS and not keys:  # a grid without audits shows no audit rows
            del counts.stages[STAGES[kind]]
            continue
        row = counts.stages[STAGES[kind]]
        row.needed, row.cached = len(keys), sum(keys.values())
    return counts
