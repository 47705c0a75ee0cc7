"""Stage 3: the unlearned model — the target after a method's unlearning on the task's forget set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qubench import store
from qubench.device import CPU, Device
from qubench.fingerprint import model_fingerprint
from qubench.stages.base import Stage
from qubench.stages.models import PreparedModels

#: The side file an unlearned folder carries: steps, losses and the method's own record.
LOG_FILE = "qubench_unlearn_log.json"


class Unlearned(Stage):
    kind = "unlearned"
    description = "unlearned models (save_pretrained folders)"
    step = "unlearn"
    group_shared = True

    def __init__(self, method, seed: int, models: PreparedModels, data, progress: bool = True,
                 parallelism=None, log=lambda msg: None, device: Device = CPU):
        self.method, self.seed, self.models, self.data, self.progress = method, seed, models, data, progress
        self.parallelism, self.log = parallelism, log  # how training is spread over processes: not identity
        self.device = device

    def params(self) -> dict[str, Any]:
        """The method's parameters as they run: precision `auto` resolved for the device (bf16 on CUDA,
        fp32 on CPU), so artifacts trained at different precisions never share a key."""
        params = self.method.params()
        if "precision" in params:
            from qubench.methods.runtime import resolve_precision

            params = {**params, "precision": resolve_precision(params["precision"], self.device.kind)}
        return params

    def identity(self) -> dict[str, Any]:
        ident = {"target": model_fingerprint(self.models.target_dir), "method": self.method.name,
                 "params": self.params(), "seed": self.seed,
                 # The corpora it unlearns from: one target can serve tasks with different forget sets.
                 "forget": store.stable_hash(self.data.forget), "retain": store.stable_hash(self.data.retain)}
        if self.method.uses_retrain_model and self.models.retrain_dir is not None:
            ident["retrain"] = model_fingerprint(self.models.retrain_dir)
        return {**ident, **self.device.identity()}

    #: The timing a result records this stage's work under.
    timing = "unlearn"

    def space_needed(self) -> int:
        from qubench.preflight import folder_size

        return folder_size(self.models.target_dir)  # at most the size of the model it starts from

    def label(self) -> str:
        return self.method.name

    def activity(self) -> str:
        return f"unlearning with {self.method.name}"

    def check_inputs(self, unlearned_dir: Path, data) -> None:
        """qubench's own unlearned model needs no input checks (an audit's external model does:
        `qubench.stages.external.ExternalUnlearned`)."""
        return None

    def check_separation(self, separation) -> None:
        """A run reports its separation (the result records it) but does not stop on it."""

    def build(self, tmp: Path) -> None:
        from qubench.methods import launch
        from qubench.methods.base import UnlearnContext
        from qubench.methods.runtime import Parallelism

        ctx = UnlearnContext(self.models.target_dir, self.models.retrain_dir, self.data, tmp, self.seed, self.progress,
                             device=self.device.torch_device)
        # In process, or on N processes; on the run's device kind either way.
        plan = (self.parallelism or Parallelism()).model_copy(update={"device": self.device.kind})
        outcome = launch.unlearn(self.method, ctx, plan, self.log)
        store.write_json_atomic(tmp / LOG_FILE, {"steps": outcome.steps,
                                                 "final": outcome.log[-1] if outcome.log else {},
                                                 "extra": outcome.extra, "log": outcome.log})


def read_log(unlearned_dir: Path) -> dict:
    """Steps, last-step losses and the method's record of an unlearned folder ({} when it has none)."""
    path = Path(unlearned_dir) / LOG_FILE
    if not path.exists():
        return {}
    log = store.read_json(path)
    return {"steps": log.get("steps"), "final": log.get("final"), "extra": log.get("extra", {})}
