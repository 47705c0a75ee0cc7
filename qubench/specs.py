"""Typed, frozen specs: what the user asks for. Hashing a spec names its result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qubench import store

#: Rows per generation / log-prob batch of the evaluation engines. 64, not 16: greedy decoding of the
#: default task's tiny model is dominated by per-step overhead, and 64 rows take about a third less
#: CPU than 16 for the same outputs (benchmarks/eval_speed.py; tests/test_eval_invariance.py).
DEFAULT_BATCH_SIZE = 64

#: Evaluation batch size: a number, or "auto" (fitted to the free memory of the GPU a model is on;
#: the engine records what it used).
EvalBatchSize = Annotated[int, Field(ge=1)] | Literal["auto"]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginRef(Frozen):
    """A plugin name and its parameters (validated by the plugin's own config)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


#: The method name of an audit: "external:<name>" names a checkpoint unlearned outside qubench, not a plugin.
EXTERNAL_PREFIX = "external:"


class AuditInput(Frozen):
    """An unlearned model qubench did not make (`qubench audit`): no unlearning stage runs; it is
    quantized and measured against the spec's target as a method's output would be."""

    #: A save_pretrained folder, a hub ID (owner/name[@revision]) or a peft LoRA adapter folder.
    unlearned: str = Field(min_length=1)
    allow_identical: bool = False          # audit a checkpoint whose weights equal the target's (nothing unlearned)
    allow_no_separation: bool = False      # audit although the target does not remember the forget set measurably


def external_name(ref: str) -> str:
    """The default name of an audited checkpoint: a local folder's name, else the hub ID as given."""
    path = Path(ref).expanduser()
    return path.resolve().name if path.exists() else ref


class RunSpec(Frozen):
    task: PluginRef = PluginRef(name="synth-news")
    method: PluginRef = PluginRef(name="ga_gdr")
    quant: PluginRef = PluginRef(name="rtn-4bit")
    model: str | None = None           # None: the task's own target (trained locally for offline tasks)
    retrain_model: str | None = None
    seed: int = 0
    engine: PluginRef = PluginRef(name="hf")
    batch_size: EvalBatchSize = DEFAULT_BATCH_SIZE
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    eval_limit: int | None = Field(None, ge=1)  # evaluate only the first N probes of each set (smoke tests)
    audit: AuditInput | None = None     # set: audit this external unlearned model instead of unlearning

    @model_validator(mode="after")
    def _audit_method(self) -> "RunSpec":
        # The method of an audit is the checkpoint's label, so results, aggregates and the leaderboard
        # name it where they name a method, and never confuse it with a plugin.
        if self.audit is not None and (not self.method.name.startswith(EXTERNAL_PREFIX) or self.method.params
                                       or self.method.name == EXTERNAL_PREFIX):
            raise ValueError(f"an audit's method must be '{EXTERNAL_PREFIX}<name>' without parameters, "
                             f"not {self.method.name!r}")
        if self.audit is not None and self.model is None:
            raise ValueError("an audit needs its target: `model` (--target) is the model the checkpoint was "
                             "unlearned from")
        return self

    def engine_params(self) -> dict[str, Any]:
        """The engine's parameters: its own, over the spec's evaluation batch size."""
        return {"batch_size": self.batch_size, **self.engine.params}

    def run_id(self) -> str:
        # `audit` is left out when unset, so the run IDs of every spec written before audits existed stay valid.
        return store.stable_hash(self.model_dump(mode="json", exclude={"audit"} if self.audit is None else None))
