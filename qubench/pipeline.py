"""`qubench run`: task data -> target model -> unlearn -> quantize -> evaluate -> score -> publish.

A straight pass over the run's stage objects (`qubench.stages.run.RunStages`): each stage's output is
cached under QUBENCH_HOME by a hash of what determines it, so the target's own evaluations, unlearned
models and quantized checkpoints are computed once and shared by every run that needs them.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from qubench import preflight, results, store
from qubench.errors import QubenchError
from qubench.evaluation.measure import measure_models
from qubench.fingerprint import model_fingerprint
from qubench.scoring import diagnostics_for, score
from qubench.specs import RunSpec
from qubench.stages import Evaluation, Quantized, TaskData, Unlearned
from qubench.stages.models import ExistingModels, PreparedModels
from qubench.stages.quantized import read_record
from qubench.stages.run import Plugins, RunStages
from qubench.stages.unlearned import read_log
from qubench.tasks import muse_layout

Log = Callable[[str], None]
#: The step a failure outside every stage is recorded under.
SCORE_STEP = "score"
#: Where a finished run's result goes when its results folder cannot take it (under QUBENCH_HOME).
UNSAVED_KIND = "unsaved_results"

__all__ = ["Plugins", "ResultNotSaved", "RunFailed", "result_path", "run"]


@dataclass
class Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    return results_dir / f"{spec.task.name}__{spec.method.name}__{spec.quant.name}__s{spec.seed}__{spec.run_id()}.json"


def run(spec: RunSpec, results_dir: Path, force: bool = False, log: Log = print,
        progress: bool = True) -> results.RunResult:
    """Run one spec; reuse its stored result unless `force` or it had failed. `force` also rebuilds
    every cached stage the run uses (shared ones included: see `store.rebuilding`)."""
    out = result_path(results_dir, spec)
    if not force and (stored := results.stored_ok(out, spec)) is not None:
        log(f"reusing stored result {out} (pass --force to recompute)")
        return stored
    plugins = Plugins.from_spec(spec)  # bad names/params fail here, before any work
    stages = RunStages(spec, plugins, log, progress)
    models = stages.models(data=None)  # a model option that cannot apply to this task fails here, before any work
    if isinstance(models, ExistingModels):
        models.check()  # and so does a model folder that cannot be loaded
    preflight.writable_folder(Path(results_dir), "results folder", preflight.MIN_FREE_RESULTS)
    preflight.writable_folder(store.home_path(), "QUBENCH_HOME", preflight.MIN_FREE_HOME)
    with store.rebuilding() if force else nullcontext():
        return _run(spec, plugins, stages, out, log)


def _run(spec: RunSpec, plugins: Plugins, stages: RunStages, out: Path, log: Log) -> results.RunResult:
    timer = Timer()
    step = TaskData.step
    result = results.RunResult(run_id=spec.run_id(), status="failed", spec=spec)
    try:
        data_dir = timer("prepare_task", stages.task_data().get)
        data = muse_layout.load(data_dir)
        result.data_hashes = data.file_hashes()
        models: PreparedModels = timer("prepare_models", stages.models(data).get_models)

        step = Unlearned.step
        unlearned = stages.unlearned(models, data)
        if not unlearned.exists():
            log(f"unlearning with {plugins.method.name} ...")
        unlearned_dir = timer("unlearn", unlearned.get)

        step = Quantized.step
        q_target = timer("quantize", _quantized, stages.quantized(models.target_dir, data), log)
        q_unlearned = timer("quantize", _quantized, stages.quantized(unlearned_dir, data), log)

        step = Evaluation.step
        evaluations = stages.evaluations(stages.eval_setup(data, data_dir), models, unlearned_dir, q_target,
                                         q_unlearned)
        measured = timer("evaluate", measure_models, evaluations, plugins.task.published_auc_retrain,
                         spec.task.name)

        step = SCORE_STEP
        result.metrics = score(measured)
        result.diagnostics = timer("diagnostics", diagnostics_for, plugins.quant, models.target_dir,
                                   unlearned_dir, q_target, q_unlearned)
        result.unlearning = read_log(unlearned_dir)
        result.resolved = _resolved(plugins, models, unlearned_dir, q_target, q_unlearned, measured)
        result.resolved["seed"] = _seed_use(spec, models)
        result.status = "ok"
    except Exception as exc:
        result.error = results.ErrorInfo(stage=step, type=type(exc).__name__, message=str(exc),
                                         traceback=traceback.format_exc())
        if not isinstance(exc, QubenchError):
            log(f"[red]stage {step} failed[/red]: {type(exc).__name__}: {exc}")
    finally:
        from qubench.env import environment

        result.timings = timer.timings
        result.environment = environment(spec)
        kept = _save(result, out)
    if kept is not None:
        raise ResultNotSaved(result, out, *kept)
    if result.error is not None:
        raise RunFailed(result, out)
    return result


def _save(result: results.RunResult, out: Path) -> tuple[Path, str] | None:
    """Write the result to `out`; if that fails after all the compute (the folder went away, the disk
    filled up), keep it under QUBENCH_HOME (else the temp folder) and return (where, why)."""
    try:
        results.save(result, out)
        return None
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc.strerror or exc}"
    for folder in (store.home() / UNSAVED_KIND, Path(tempfile.gettempdir()) / "qubench-unsaved-results"):
        try:
            results.save(result, folder / out.name)
            return folder / out.name, why
        except OSError:
            continue
    raise ResultNotSaved(result, out, None, why)


def _quantized(stage: Quantized, log: Log) -> Path:
    if not stage.exists():
        log(f"quantizing {stage.model_dir.name} with {stage.quant.name} ...")
    return stage.get()


def _seed_use(spec: RunSpec, models: PreparedModels) -> dict:
    """What the run's seed varied, for the record."""
    return {"run": spec.seed, "unlearning": spec.seed,
            "target_training": models.recipe["seed"] if models.recipe else None,
            "note": ("target and retrain trained here with recipe seed = task recipe seed + run seed"
                     if models.recipe else "existing target/retrain models: the seed varies unlearning only")}


class ResultNotSaved(QubenchError):
    """The run finished but its result could not be written to the results folder."""

    def __init__(self, result: results.RunResult, path: Path, kept: Path | None, why: str):
        where = f"it is kept at {kept} (`qubench show {kept}`; copy it to {path.parent} once that is writable)" \
            if kept is not None else "it could not be kept anywhere else either"
        super().__init__(f"the run finished (status {result.status}) but its result could not be written to {path} "
                         f"({why}); {where}. Every stage it computed is cached: a rerun only scores again.")
        self.result, self.path, self.kept = result, path, kept


class RunFailed(QubenchError):
    def __init__(self, result: results.RunResult, path: Path):
        err = result.error
        super().__init__(f"run failed in stage {err.stage}: {err.type}: {err.message} (recorded in {path})")
        self.result = result
        self.path = path


def _resolved(plugins: Plugins, models: PreparedModels, unlearned_dir: Path, q_target: Path, q_unlearned: Path,
              measured) -> dict:
    return {
        "task": {"name": plugins.task.name, "params": plugins.task.params(), "note": plugins.task.note,
                 "utility_metric": plugins.task.utility_metric},
        "method": {"name": plugins.method.name, "params": plugins.method.params()},
        "quant": {"name": plugins.quant.name, "params": plugins.quant.params(), "scheme": plugins.quant.scheme(),
                  "checkpoint": read_record(q_unlearned)},
        "engine": {"name": plugins.engine.name, "params": plugins.engine.params(),
                   "version": plugins.engine.version()},
        "models": {
            "target": {"id": models.target_id, "fingerprint": model_fingerprint(models.target_dir)},
            "retrain": {"id": models.retrain_id,
                        "fingerprint": model_fingerprint(models.retrain_dir) if models.retrain_dir else None},
            "unlearned": {"fingerprint": model_fingerprint(unlearned_dir)},
            "recipe": models.recipe,
        },
        "privleak_reference": measured.auc_reference,
    }
