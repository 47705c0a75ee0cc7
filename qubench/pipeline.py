"""`qubench run` and `qubench audit`: task data -> target model -> unlearned model -> checks -> evaluate
at full precision -> separation -> quantize -> evaluate quantized -> score -> publish.

A straight pass over the run's stage objects (`qubench.stages.run.RunStages`): each stage's output is
cached under QUBENCH_HOME by a hash of what determines it, so the target's own evaluations, unlearned
models and quantized checkpoints are computed once and shared by every run that needs them. A run and
an audit differ only in where the unlearned model comes from (`RunStages.unlearned`): a method's
unlearning, or a checkpoint made elsewhere, whose input checks refuse bad input before any quantizer runs.
"""

from __future__ import annotations

import re
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from qubench import preflight, results, store
from qubench.device import Device
from qubench.device import resolve as resolve_device
from qubench.errors import QubenchError
from qubench.evaluation.measure import measure_models
from qubench.fingerprint import model_fingerprint
from qubench.methods.runtime import Parallelism
from qubench.progress import reporting
from qubench.progress import stage as log_stage
from qubench.scoring import diagnostics_for, score, separation
from qubench.specs import RunSpec
from qubench.stages import Evaluation, Quantized, TaskData
from qubench.stages.external import CHECK_STEP, changed_since
from qubench.models.prepare import TRAINING_LOG
from qubench.stages.models import ExistingModels, PreparedModels
from qubench.stages.quantized import read_record
from qubench.stages.run import Plugins, RunStages
from qubench.stages.unlearned import read_log
from qubench.tasks import muse_layout

Log = Callable[[str], None]
#: The step a failure outside every stage is recorded under.
SCORE_STEP = "score"
#: Where a finished result goes when its results folder cannot be written (under QUBENCH_HOME).
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


def _file_part(name: str) -> str:
    # Plugin names are file-safe already; an audited checkpoint's name may be a path or hub ID (owner/name).
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    return results_dir / (f"{spec.task.name}__{_file_part(spec.method.name)}__{spec.quant.name}__s{spec.seed}__"
                          f"{spec.run_id()}.json")


def run(spec: RunSpec, results_dir: Path, force: bool = False, log: Log = print,
        progress: bool = True, device: str | Device = "auto",
        parallelism: Parallelism | None = None, plan_memory: bool = False,
        max_memory: str | None = None) -> results.RunResult:
    """Run one spec (an audit when `spec.audit` is set) on `device` (auto, cpu, cuda, cuda:N; see
    qubench.device); reuse its stored result unless `force`, it had failed, or the audited checkpoint
    changed since. `force` also rebuilds every cached stage the run uses (shared ones included: see
    `store.rebuilding`). The device and `parallelism` (how the unlearn stage is spread over processes) are
    how the run executes, not what it measures: not part of the result's name; the result records them.
    `plan_memory`: before any model is loaded, hold the memory plan (qubench.memplan) against the devices
    (`max_memory`: the budget per device instead of the free memory) and stop a run that cannot fit."""
    out = result_path(results_dir, spec)
    if not force and (stored := results.stored_ok(out, spec)) is not None:
        changed = changed_since(spec.audit, stored) if spec.audit is not None else None
        if changed is None:
            ran_on = (stored.resolved.get("device") or {}).get("kind", "cpu")
            log(f"reusing stored result {out}, computed on {ran_on} (pass --force to recompute)")
            return stored
        log(f"recomputing {out}: {changed}")
    device = resolve_device(device)  # a GPU that is not there fails here, before any work
    plugins = Plugins.from_spec(spec, device=device)  # bad names/params fail here, before any work
    stages = RunStages(spec, plugins, log, progress, parallelism, device)
    models = stages.models(data=None)  # a model option that cannot apply to this task fails here, before any work
    if isinstance(models, ExistingModels):
        models.check()  # and so does a model folder that cannot be loaded
    preflight.writable_folder(Path(results_dir), "results folder", preflight.MIN_FREE_RESULTS)
    preflight.writable_folder(store.home_path(), "QUBENCH_HOME", preflight.MIN_FREE_HOME)
    if plan_memory:
        from qubench.memplan.build import check_before_run

        with reporting(log):  # it prepares the task data: that stage's lines are printed here, not later
            check_before_run(spec, stages, parallelism or Parallelism(), max_memory, device.choice, log)
    with store.rebuilding() if force else nullcontext():
        return _run(spec, plugins, stages, out, log, device)


def _run(spec: RunSpec, plugins: Plugins, stages: RunStages, out: Path, log: Log, device: Device) -> results.RunResult:
    timer = Timer()
    step = TaskData.step
    result = results.RunResult(run_id=spec.run_id(), status="failed", spec=spec)
    # Every stage says when it starts and ends (or that it was cached) through `log`: see qubench.progress.
    with reporting(log):
        try:
            data_dir = timer("prepare_task", stages.task_data().get)
            data = muse_layout.load(data_dir)
            result.data_hashes = data.file_hashes()
            models: PreparedModels = timer("prepare_models", stages.models(data).get_models)

            unlearned = stages.unlearned(models, data)  # a method's unlearning, or an audit's external checkpoint
            step = unlearned.step
            unlearned_dir = timer(unlearned.timing, unlearned.get)
            step = CHECK_STEP  # an audit's bad input stops here, before anything is quantized or evaluated
            audit = timer(unlearned.timing, unlearned.check_inputs, unlearned_dir, data)

            step = Evaluation.step
            setup = stages.eval_setup(data, data_dir)
            measure = lambda evaluations: timer("evaluate", measure_models, evaluations,
                                                plugins.task.published_auc_retrain, spec.task.name)
            # The target and retrain first: whether the target remembers the forget set at all
            separated = separation(measure(stages.evaluations(setup, models, None, None, None)))
            step = CHECK_STEP
            unlearned.check_separation(separated)  # an audit without separation stops here, before quantizing

            step = Quantized.step
            q_target = timer("quantize", stages.quantized(models.target_dir, data, "target").get)
            q_unlearned = timer("quantize", stages.quantized(unlearned_dir, data, "unlearned").get)
            # The retrain reference at the quantized precision too: the damage-controlled recovery compares
            # every model with both references at the same precision.
            q_retrain = (timer("quantize", stages.quantized(models.retrain_dir, data, "retrain").get)
                         if models.retrain_dir is not None else None)

            step = Evaluation.step
            measured = measure(stages.evaluations(setup, models, unlearned_dir, q_target, q_unlearned, q_retrain))

            step = SCORE_STEP
            result.metrics = score(measured)
            result.probes = measured.probes
            result.separation = separation(measured)
            with log_stage("computing weight diagnostics"):
                result.diagnostics = timer("diagnostics", diagnostics_for, plugins.quant, models.target_dir,
                                           unlearned_dir, q_target, q_unlearned)
            result.unlearning = read_log(unlearned_dir)
            result.resolved = _resolved(spec, plugins, models, unlearned_dir, q_target, q_unlearned, measured,
                                        audit)
            result.resolved["seed"] = _seed_use(spec, models)
            result.resolved["training"] = result.unlearning.get("extra", {}).get("training")  # how it trained
            result.resolved["device"] = device.record()
            result.status = "ok"
        except Exception as exc:
            result.error = results.ErrorInfo(stage=step, type=type(exc).__name__, message=str(exc),
                                             traceback=traceback.format_exc())
            if not isinstance(exc, QubenchError):
                log(f"stage {step} failed: {type(exc).__name__}: {exc}")
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


def _training_record(models: PreparedModels) -> dict | None:
    """How the target and retrain models trained here were trained (threads, time), from their log."""
    if models.recipe is None:
        return None
    path = Path(models.target_dir).parent / TRAINING_LOG
    if not path.is_file():
        return None
    log = store.read_json(path)
    return {k: log.get(k) for k in ("torch_threads", "seconds")}


def _seed_use(spec: RunSpec, models: PreparedModels) -> dict:
    """What the run's seed varied, for the record."""
    if spec.audit is not None:
        return {"run": spec.seed, "unlearning": None,
                "target_training": models.recipe["seed"] if models.recipe else None,
                "note": "audit of a checkpoint unlearned elsewhere: nothing is unlearned here"
                        + ("; the seed picks the target trained here" if models.recipe else "")}
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


def _resolved(spec: RunSpec, plugins: Plugins, models: PreparedModels, unlearned_dir: Path, q_target: Path,
              q_unlearned: Path, measured, audit: dict | None) -> dict:
    # An audit's method is the checkpoint it audits: its identity and whatever provenance it carries.
    method = ({"name": plugins.method.name, "params": plugins.method.params(), "control": plugins.method.is_control}
              if audit is None else {"name": spec.method.name, "params": {}, "external": audit["checkpoint"]})
    return {
        "task": {"name": plugins.task.name, "params": plugins.task.params(), "note": plugins.task.note,
                 "utility_metric": plugins.task.utility_metric},
        "method": method,
        **({} if audit is None else {"audit": {k: v for k, v in audit.items() if k != "checkpoint"}}),
        "quant": {"name": plugins.quant.name, "params": plugins.quant.params(), "scheme": plugins.quant.scheme(),
                  "checkpoint": read_record(q_unlearned)},
        "engine": {"name": plugins.engine.name, "params": plugins.engine.params(),
                   "version": plugins.engine.version(), **plugins.engine.choice_record()},
        "models": {
            "target": {"id": models.target_id, "fingerprint": model_fingerprint(models.target_dir)},
            "retrain": {"id": models.retrain_id,
                        "fingerprint": model_fingerprint(models.retrain_dir) if models.retrain_dir else None},
            "unlearned": {"fingerprint": model_fingerprint(unlearned_dir),
                          **({} if spec.audit is None else {"id": spec.audit.unlearned})},
            "recipe": models.recipe,
            "trained_with": _training_record(models),
        },
        "privleak_reference": measured.auc_reference,
    }
