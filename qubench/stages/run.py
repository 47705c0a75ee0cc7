"""The stages of one run spec, as objects: what `qubench run` builds in order, what the grid planner
asks about (does it exist?), and what the pruner deletes. One place decides how a spec maps to its
artifacts; nothing else re-derives a key or a path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from qubench import registry
from qubench.device import CPU, Device, device_kwargs
from qubench.engines.base import Engine
from qubench.errors import ConfigError
from qubench.methods.base import UnlearnMethod
from qubench.plugin import Plugin
from qubench.quantizers.base import Quantizer
from qubench.specs import EXTERNAL_PREFIX, RunSpec
from qubench.stages.data import TaskData
from qubench.stages.evaluation import EvalSetup, Evaluation
from qubench.stages.external import ExternalUnlearned
from qubench.stages.models import ExistingModels, PreparedModels, TrainedModels, models_stage
from qubench.stages.quantized import Quantized
from qubench.stages.unlearned import Unlearned
from qubench.tasks.base import Task


@dataclass
class Plugins:
    """Every plugin of a run, instantiated (and so validated) before any work starts."""

    task: Task
    method: UnlearnMethod | None  # None for an audit: its unlearned model was made elsewhere
    quant: Quantizer
    engine: Engine

    @classmethod
    def from_spec(cls, spec: RunSpec, create: Callable[[str, str, dict], Plugin] = registry.create,
                  device: Device = CPU) -> "Plugins":
        from qubench.engines.auto import AutoEngine

        if spec.audit is None and spec.method.name.startswith(EXTERNAL_PREFIX):
            raise ConfigError(f"method {spec.method.name!r} names an audited checkpoint, not a plugin: audit a "
                              "model unlearned elsewhere with `qubench audit --unlearned PATH_OR_ID` (or a grid "
                              "spec's `audits:`)")
        quant = create("quantizers", spec.quant.name, spec.quant.params)
        engine = create("engines", spec.engine.name, spec.engine_params())
        if isinstance(engine, AutoEngine):  # `auto` stands for the engine it picks on this device
            engine = engine.choose(device, quant)
        return cls(task=create("tasks", spec.task.name, spec.task.params),
                   method=None if spec.audit is not None else create("methods", spec.method.name, spec.method.params),
                   quant=quant, engine=engine)


class RunStages:
    """The stage objects of `spec` on `device`; each needs its upstream artifacts (paths, data) to be named."""

    def __init__(self, spec: RunSpec, plugins: Plugins | None = None, log: Log = lambda msg: None,
                 progress: bool = True, parallelism=None, device: Device = CPU):
        self.spec, self.log, self.progress, self.device = spec, log, progress, device
        self.parallelism = parallelism  # how unlearning is spread over processes (methods.runtime.Parallelism)
        self.plugins = plugins or Plugins.from_spec(spec, device=device)

    def task_data(self) -> TaskData:
        return TaskData(self.plugins.task)

    def models(self, data) -> TrainedModels | ExistingModels:
        """`data` (TaskData) is read only for models trained here; None is fine for existing ones."""
        return models_stage(self.plugins.task, data, self.spec.model, self.spec.retrain_model, self.spec.seed,
                            self.progress, self.device)

    def unlearned(self, models: PreparedModels | None, data) -> Unlearned | ExternalUnlearned:
        """Where the unlearned model comes from: the method's unlearning, or (audits) an external checkpoint."""
        if self.spec.audit is not None:
            return ExternalUnlearned(self.spec.audit, models, self.spec.model, self.log)
        return Unlearned(self.plugins.method, self.spec.seed, models, data, self.progress, self.parallelism, self.log,
                         self.device)

    def quantized(self, model_dir: Path, data, what: str | None = None) -> Quantized:
        return Quantized(self.plugins.quant, model_dir, data, what, self.device)

    def eval_setup(self, data, data_dir: Path) -> EvalSetup:
        return EvalSetup(self.plugins.engine, data, data_dir, self.spec.eval_limit, self.spec.dtype, self.device)

    def evaluations(self, setup: EvalSetup, models: PreparedModels, unlearned_dir: Path | None,
                    q_target: Path | None, q_unlearned: Path | None,
                    q_retrain: Path | None = None) -> dict[str, Evaluation]:
        """The measurements a run compares, by label; models not built yet (None) are left out. The
        quantized retrain model is the reference of the damage-controlled recovery (qubench.recovery)."""
        quant = self.plugins.quant
        load_quantized = partial(quant.load_quantized, **device_kwargs(quant.load_quantized, self.device))
        wanted = {"retrain": ("retrain", models.retrain_dir, self.load_full),
                  "retrain_post": (f"retrain/{quant.name}", q_retrain, load_quantized),
                  "target_pre": ("target", models.target_dir, self.load_full),
                  "target_post": (f"target/{quant.name}", q_target, load_quantized),
                  "pre": ("unlearned", unlearned_dir, self.load_full),
                  "post": (f"unlearned/{quant.name}", q_unlearned, load_quantized)}
        return {key: Evaluation(setup, path, what, loader) for key, (what, path, loader) in wanted.items()
                if path is not None}

    def load_full(self, model_dir: Path):
        """A full-precision model in the spec's evaluation dtype, on the run's device (spread over the
        visible GPUs when it does not fit one; see Device.from_pretrained_kwargs)."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, self.spec.dtype),
                                                    **self.device.from_pretrained_kwargs()).eval()
