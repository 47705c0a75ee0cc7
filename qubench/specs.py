"""Typed, frozen specs: what the user asks for. Hashing a spec names its result."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench import store

#: Rows per generation / log-prob batch of the evaluation engines. 64, not 16: greedy decoding of the
#: default task's tiny model is dominated by per-step overhead, and 64 rows take about a third less
#: CPU than 16 for the same outputs (benchmarks/eval_speed.py; tests/test_eval_invariance.py).
DEFAULT_BATCH_SIZE = 64


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
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    eval_limit: int | None = Field(None, ge=1)  # evaluate only the first N probes of each set (smoke tests)

    def run_id(self) -> str:
        return store.stable_hash(self.model_dump(mode="json"))
