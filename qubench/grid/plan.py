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
    """Groups in run order: task, then seed (one target at a time), then method; quantizers inside."""
    groups = []
    for task in grid.tasks:
        for seed in grid.seeds:
            for method in grid.methods:
                cells = tuple(Cell(task.id, method.id, quant.id, seed, grid.run_spec(task, method, quant, seed))
                              for quant in grid.quantizers)
                groups.append(Group(task.id, seed, method.id, cells))
    return groups


def all_cells(groups: list[Group]) -> list[Cell]:
    return [cell for group in groups for cell in group.cells]


def stored_status(cell: Cell, results_dir: Path) -> str | None:
    """"ok" or "failed" for a stored result of the cell's exact spec, None if there is none."""
    path = cell.result_file(results_dir)
    if not path.exists():
        return None
    try:
        return results.load(path).status
    except (ValueError, OSError):
        return "failed"  # unreadable: run it again


# --- dry-run counts -------------------------------------------------------------------------------

STAGES = ("task data", "target/retrain models", "unlearned models", "quantized checkpoints", "evaluations")


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
    stages: dict[str, StageCount] = field(default_factory=lambda: OrderedDict((s, StageCount(s)) for s in STAGES))
    exact: bool = True           # False when upstream stages are missing, so downstream keys are estimates

    def as_dict(self) -> dict:
        return {"cells": self.cells, "cells_done": self.cells_done, "cells_failed_before": self.cells_failed_before,
                "cells_to_run": self.cells - self.cells_done, "exact": self.exact,
                "stages": {s.stage: {"needed": s.needed, "cached": s.cached, "to_run": s.to_run}
                           for s in self.stages.values()}}


@dataclass
class Artifacts:
    """The cache paths of one cell's stages; None where an upstream artifact does not exist yet."""

    data_dir: Path
    data: object | None
    models_key: object              # the models' cache folder, or a symbolic key for models not here
    target: Path | None
    retrain: Path | None
    has_retrain: bool
    unlearned: Path | None          # computable once the target exists
    q_target: Path | None           # computable once the target and the task data exist
    q_unlearned: Path | None


class Resolver:
    """Computes cells' cache paths, with plugins and task data loaded once."""

    def __init__(self):
        self._plugins: dict[str, object] = {}
        self._data: dict[Path, object] = {}

    def plugin(self, family: str, ref, extra: dict | None = None):
        params = {**(extra or {}), **ref.params}
        k = json.dumps([family, ref.name, params], sort_keys=True, default=str)
        if k not in self._plugins:
            self._plugins[k] = registry.create(family, ref.name, params)
        return self._plugins[k]

    def data(self, data_dir: Path):
        if data_dir not in self._data:
            from qubench.tasks import muse_layout

            self._data[data_dir] = muse_layout.load(data_dir)
        return self._data[data_dir]

    def artifacts(self, spec: RunSpec) -> Artifacts:
        from qubench.models.prepare import seeded_recipe, task_dir, trained_models_dir

        task = self.plugin("tasks", spec.task)
        data_dir = task_dir(task)
        data = self.data(data_dir) if data_dir.is_dir() else None
        recipe = seeded_recipe(task, spec.seed)
        if spec.model is not None or recipe is None:
            target_ref = spec.model or task.default_target
            retrain_ref = spec.retrain_model or (task.default_retrain if spec.model is None else None)
            target, retrain = _local_model(target_ref), _local_model(retrain_ref)
            models_key, has_retrain = ("models", target_ref, retrain_ref), retrain_ref is not None
        else:
            root = trained_models_dir(task, data, recipe) if data is not None else None
            models_key = root or ("models", spec.task.name, json.dumps(spec.task.params, sort_keys=True), spec.seed)
            built = root is not None and root.is_dir()
            target, retrain = (root / "target", root / "retrain") if built else (None, None)
            has_retrain = True
        method = self.plugin("methods", spec.method)
        quant = self.plugin("quantizers", spec.quant)
        unlearned = pipeline.unlearned_path(method, spec.seed, target) if target is not None else None
        ready = unlearned is not None and unlearned.is_dir()
        q_target = pipeline.quantized_path(quant, target, data) if target is not None and data is not None else None
        q_unlearned = pipeline.quantized_path(quant, unlearned, data) if ready and data is not None else None
        return Artifacts(data_dir, data, models_key, target, retrain, has_retrain, unlearned, q_target, q_unlearned)


class _StageKeys:
    """Collects each stage's artifacts (deduplicated by cache path) for the cells still to run."""

    def __init__(self):
        self.keys: dict[str, dict[object, bool]] = {s: {} for s in STAGES}
        self.resolver = Resolver()
        self.exact = True

    def add(self, stage: str, key, exists: bool) -> None:
        self.keys[stage][key] = self.keys[stage].get(key, False) or exists

    def cell(self, spec: RunSpec) -> None:
        a = self.resolver.artifacts(spec)
        quant = self.resolver.plugin("quantizers", spec.quant)
        self.add("task data", a.data_dir, a.data is not None)
        self.add("target/retrain models", a.models_key, a.target is not None)
        method_key = ("unlearned", a.models_key, spec.method.name, json.dumps(spec.method.params, sort_keys=True),
                      spec.seed)
        self.add("unlearned models", a.unlearned or method_key, a.unlearned is not None and a.unlearned.is_dir())
        unlearned = a.unlearned if a.unlearned is not None and a.unlearned.is_dir() else None
        quant_key = (quant.name, json.dumps(quant.params(), sort_keys=True))
        self.add("quantized checkpoints", a.q_target or ("quantized", a.models_key, quant_key),
                 a.q_target is not None and a.q_target.is_dir())
        self.add("quantized checkpoints", a.q_unlearned or ("quantized", method_key, quant_key),
                 a.q_unlearned is not None and a.q_unlearned.is_dir())

        evals = None
        if a.data is not None:
            engine = self.resolver.plugin("engines", spec.engine, {"batch_size": spec.batch_size})
            evals = pipeline.SharedEvalStage(engine, spec, a.data, a.data_dir, log=lambda msg: None)
        settings = (spec.engine.name, json.dumps(spec.engine.params, sort_keys=True), spec.batch_size,
                    spec.eval_limit, spec.dtype)
        measured = [(("target", a.models_key), a.target),
                    (("target/q", a.models_key, quant_key), _existing(a.q_target)),
                    (method_key, unlearned),
                    ((method_key, quant_key), _existing(a.q_unlearned))]
        if a.has_retrain:
            measured.append((("retrain", a.models_key), a.retrain))
        for symbolic, model_dir in measured:
            if model_dir is not None and evals is not None:
                path = evals.cache_path(model_dir)
                self.add("evaluations", path, path.exists())
            else:
                self.exact = False
                self.add("evaluations", ("eval", symbolic, settings), False)
        if unlearned is None or a.data is None:
            self.exact = False


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.is_dir() else None


def _local_model(ref: str | None) -> Path | None:
    """The folder of an existing model, without downloading anything; None if it is not here yet."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "config.json")
        return Path(found).parent if isinstance(found, str) else None
    except Exception:
        return None


def count(groups: list[Group], results_dir: Path) -> PlanCounts:
    """How many cells and stage artifacts the grid needs, and how many of each are already cached.

    Only cells without a stored ok result count: their stages are what a run would compute. Where
    an upstream artifact does not exist yet its downstream keys are estimated (`exact` is False):
    e.g. the `target` method's model is the target itself, which is only known once it exists."""
    counts = PlanCounts()
    keys = _StageKeys()
    for cell in all_cells(groups):
        counts.cells += 1
        status = stored_status(cell, results_dir)
        if status == "ok":
            counts.cells_done += 1
            continue
        counts.cells_failed_before += status == "failed"
        keys.cell(cell.spec)
    for stage, found in keys.keys.items():
        counts.stages[stage].needed = len(found)
        counts.stages[stage].cached = sum(found.values())
    counts.exact = keys.exact
    return counts
