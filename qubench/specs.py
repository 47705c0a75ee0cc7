"""Typed, frozen specs: what the user asks for. Hashing a spec names its result."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench import store

#: Evaluation batch size: a number, or "auto" (fitted to the free memory of the GPU a model is on;
#: the engine records what it used).
EvalBatchSize = Annotated[int, Field(ge=1)] | Literal["auto"]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginRef(Frozen):
    """A plugin name and its parameters (validated by the plugin's own config)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RunSpec(Frozen):
    task: PluginRef = PluginRef(name="synth-news")
    method: PluginRef = PluginRef(name="ga_gdr")
    quant: PluginRef = PluginRef(name="rtn-4bit")
    model: str | None = None           # None: the task's own target (trained locally for offline tasks)
    retrain_model: str | None = None
    seed: int = 0
    engine: PluginRef = PluginRef(name="hf")
    batch_size: EvalBatchSize = 16
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    eval_limit: int | None = Field(None, ge=1)  # evaluate only the first N probes of each set (smoke tests)

    def engine_params(self) -> dict[str, Any]:
        """The engine's parameters: its own, over the spec's evaluation batch size."""
        return {"batch_size": self.batch_size, **self.engine.params}

    def run_id(self) -> str:
        return store.stable_hash(self.model_dump(mode="json"))
