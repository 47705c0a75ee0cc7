"""`qubench run`: task data -> target model -> unlearn -> quantize -> evaluate -> score.

Each stage's output is cached under QUBENCH_HOME by a hash of what determines
it, so the target's own evaluations, unlearned models and quantized
checkpoints are computed once and shared by every run that needs them.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qubench import registry, results, store
from qubench.errors import QubenchError
from qubench.evaluation.stage import EvalStage
from qubench.fingerprint import model_fingerprint
from qubench.methods.base import UnlearnContext
from qubench.methods.runtime import Parallelism, default_device_type, resolve_precision
from qubench.models.prepare import PreparedModels, prepare_models, prepare_task
from qubench.scoring import diagnostics_for, score
from qubench.specs import RunSpec
from qubench.tasks import muse_layout

Log = Callable[[str], None]


@dataclass
class Plugins:
    """Every plugin of a run, instantiated (and so validated) before any work starts."""

    task: object
    method: object
    quant: object
    engine: object

    @classmethod
    def from_spec(cls, spec: RunSpec) -> "Plugins":
        engine_params = {"batch_size": spec.batch_size, **spec.engine.params}
        return cls(
            task=registry.create("tasks", spec.task.name, spec.task.params),
            method=registry.create("methods", spec.method.name, spec.method.params),
            quant=registry.create("quantizers", spec.quant.name, spec.quant.params),
            engine=registry.create("engines", spec.engine.name, engine_params),
        )


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
        progress: bool = True, parallelism: Parallelism | None = None) -> results.RunResult:
    """Run one spec; reuse its stored result unless `force` or it had failed. `parallelism`: how the unlearn
    stage is spread over processes (not part of the run's identity; the result records what ran)."""
    out = result_path(results_dir, spec)
    if out.exists() and not force:
        stored = results.load(out)
        if stored.status == "ok":
            log(f"reusing stored result {out} (pass --force to recompute)")
            return stored
    plugins = Plugins.from_spec(spec)  # bad names/params fail here, before any work
    timer = Timer()
    stage = "prepare"
    result = results.RunResult(run_id=spec.run_id(), status="failed", spec=spec)
    try:
        data_dir = timer("prepare_task", prepare_task, plugins.task)
        data = muse_layout.load(data_dir)
        result.data_hashes = data.file_hashes()
        models: PreparedModels = timer("prepare_models", prepare_models, plugins.task, data, spec.model,
                                       spec.retrain_model, progress, seed=spec.seed)
        stage = "unlearn"
        unlearned_dir = timer("unlearn", _unlearn, plugins.method, spec, models, data, log, progress, parallelism)
        stage = "quantize"
        q_target = timer("quantize", _quantize, plugins.quant, models.target_dir, data, log)
        q_unlearned = timer("quantize", _quantize, plugins.quant, unlearned_dir, data, log)
        stage = "evaluate"
        evals = SharedEvalStage(plugins.engine, spec, data, data_dir, log, plugins.task.published_auc_retrain)
        measured = timer("evaluate", evals.measure_all, models, unlearned_dir, plugins.quant, q_target, q_unlearned)
        stage = "score"
        result.metrics = score(measured)
        result.diagnostics = timer("diagnostics", diagnostics_for, plugins.quant, models.target_dir,
                                   unlearned_dir, q_target, q_unlearned)
        result.unlearning = _read_unlearn_log(unlearned_dir)
        result.resolved = _resolved(plugins, models, unlearned_dir, q_target, q_unlearned, measured)
        result.resolved["seed"] = _seed_use(spec, models)
        result.resolved["training"] = result.unlearning.get("extra", {}).get("training")  # how it trained
        result.status = "ok"
    except Exception as exc:
        result.error = results.ErrorInfo(stage=stage, type=type(exc).__name__, message=str(exc),
                                         traceback=traceback.format_exc())
        if not isinstance(exc, QubenchError):
            log(f"[red]stage {stage} failed[/red]: {type(exc).__name__}: {exc}")
    finally:
        from qubench.env import environment

        result.timings = timer.timings
        result.environment = environment(spec)
        results.save(result, out)
    if result.error is not None:
        raise RunFailed(result, out)
    return result


class SharedEvalStage(EvalStage):
    """The evaluate stage with one lock per measurement: parallel grid workers that need the same
    measurement (the target's, shared by every method) compute it once; the others wait, then read it."""

    def cache_path(self, model_dir: Path) -> Path:
        # The file EvalStage.measure stores the measurement in (tests/test_grid.py checks that a
        # finished grid's plan finds every evaluation cached, so a change there cannot go unnoticed).
        key = store.stable_hash({"model": model_fingerprint(model_dir), **self.settings})
        return store.home() / "evals" / f"{key}.json"

    def measure(self, label: str, model_dir: Path, loader) -> dict[str, float | None]:
        with store.locked(self.cache_path(model_dir)):
            return super().measure(label, model_dir, loader)


def _seed_use(spec: RunSpec, models: PreparedModels) -> dict:
    """What the run's seed varied, for the record."""
    return {"run": spec.seed, "unlearning": spec.seed,
            "target_training": models.recipe["seed"] if models.recipe else None,
            "note": ("target and retrain trained here with recipe seed = task recipe seed + run seed"
                     if models.recipe else "existing target/retrain models: the seed varies unlearning only")}


class RunFailed(QubenchError):
    def __init__(self, result: results.RunResult, path: Path):
        err = result.error
        super().__init__(f"run failed in stage {err.stage}: {err.type}: {err.message} (recorded in {path})")
        self.result = result
        self.path = path


def unlearned_path(method, seed: int, target_dir: Path, parallelism: Parallelism | None = None) -> Path:
    """Where the model unlearned from `target_dir` by `method` with `seed` is cached."""
    params = method.params()
    if "precision" in params:  # the key holds what runs: precision auto is bf16 on CUDA, fp32 on CPU
        device = default_device_type((parallelism or Parallelism()).device)
        params = {**params, "precision": resolve_precision(params["precision"], device)}
    key = store.stable_hash({"target": model_fingerprint(target_dir), "method": method.name,
                             "params": params, "seed": seed})
    return store.home() / "unlearned" / f"{method.name}-{key}"


def _unlearn(method, spec: RunSpec, models: PreparedModels, data, log: Log, progress: bool,
             parallelism: Parallelism | None = None) -> Path:
    from qubench.methods import launch

    path = unlearned_path(method, spec.seed, models.target_dir, parallelism)
    if not path.exists():
        log(f"unlearning with {method.name} ...")
    ctx = lambda tmp: UnlearnContext(models.target_dir, models.retrain_dir, data, tmp, spec.seed, progress)
    return store.cached_dir(path, lambda tmp: _save_unlearn_log(launch.unlearn(method, ctx(tmp), parallelism, log),
                                                                tmp))


def _save_unlearn_log(outcome, tmp: Path) -> None:
    log = {"steps": outcome.steps, "final": outcome.log[-1] if outcome.log else {}, "extra": outcome.extra,
           "log": outcome.log}
    store.write_json_atomic(tmp / "qubench_unlearn_log.json", log)


def _read_unlearn_log(unlearned_dir: Path) -> dict:
    import json

    path = unlearned_dir / "qubench_unlearn_log.json"
    if not path.exists():
        return {}
    log = json.loads(path.read_text())
    return {"steps": log.get("steps"), "final": log.get("final"), "extra": log.get("extra", {})}


def calibration_texts(data) -> list[str]:
    """Calibration for GPTQ/AWQ comes from the retain corpus, never the forget set:
    calibrating on forget text would let the quantizer fit the very knowledge
    under test and confound recovery with calibration leakage."""
    return list(data.retain or data.privleak_retain)


def quantized_path(quant, model_dir: Path, data) -> Path:
    """Where `model_dir` quantized by `quant` (calibrated on the task's retain corpus) is cached."""
    key = store.stable_hash({"model": model_fingerprint(model_dir), "quant": quant.name, "params": quant.params(),
                             "calib": store.stable_hash(calibration_texts(data))})
    return store.home() / "quantized" / f"{quant.name}-{key}"


def _quantize(quant, model_dir: Path, data, log: Log) -> Path:
    calib = calibration_texts(data)
    path = quantized_path(quant, model_dir, data)
    if not path.exists():
        log(f"quantizing {model_dir.name} with {quant.name} ...")

    def build(tmp: Path) -> None:
        outcome = quant.quantize(model_dir, tmp, calib)
        store.write_json_atomic(tmp / "qubench_quant.json", {"seconds": outcome.seconds,
                                                              "size_bytes": outcome.size_bytes,
                                                              "extra": outcome.extra,
                                                              "calibration_hash": store.stable_hash(calib),
                                                              "calibration_docs": len(calib)})

    return store.cached_dir(path, build)


def _resolved(plugins: Plugins, models: PreparedModels, unlearned_dir: Path, q_target: Path, q_unlearned: Path,
              measured) -> dict:
    import json

    return {
        "task": {"name": plugins.task.name, "params": plugins.task.params(), "note": plugins.task.note,
                 "utility_metric": plugins.task.utility_metric},
        "method": {"name": plugins.method.name, "params": plugins.method.params()},
        "quant": {"name": plugins.quant.name, "params": plugins.quant.params(), "scheme": plugins.quant.scheme(),
                  "checkpoint": json.loads((q_unlearned / "qubench_quant.json").read_text())},
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
