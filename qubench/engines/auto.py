"""`--engine auto`: vLLM where it can serve the run, else the in-process `hf` engine.

vLLM is the serving path (real low-bit kernels, continuous batching), but it needs a GPU build of
vLLM and checkpoints it can load. `auto` picks, once per run and before any work starts:
- the `vllm` server engine when the run is on a CUDA device, vLLM is installed (importable here, or
  in the python named by $QUBENCH_VLLM_PYTHON), is a GPU build, and serves the run's quantizer;
- `hf` otherwise, with the reason.
Every checkpoint of a run is measured by the same engine (a run never mixes them: pre and post must be
comparable), so a quantizer vLLM cannot serve sends the whole run to `hf`. The chosen engine stands in
for `auto` everywhere (its name and parameters key the evaluations, so they are shared with runs that
name it explicitly), and the result records that `auto` chose it and why (`resolved.engine`).
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from typing import Any

from qubench.engines.base import Engine, EngineConfig
from qubench.errors import ConfigError


class AutoEngine(Engine):
    name = "auto"
    description = ("vLLM (server engine) on a CUDA device where a GPU build of vLLM is installed and serves the "
                   "quantizer, else hf; the result records which ran and why")
    Config = EngineConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._vllm: tuple[Engine | None, str] | None = None  # the vLLM candidate, probed once

    def choose(self, device, quant) -> Engine:
        """The engine this run uses on `device` (a qubench.device.Device) with quantizer `quant`."""
        engine, reason = self._pick(device, quant)
        engine.chosen_by_auto = {"requested": "auto", "reason": reason}
        return engine

    def _pick(self, device, quant) -> tuple[Engine, str]:
        from qubench.engines.hf import HFEngine

        params = {"batch_size": self.config.batch_size}
        hf = lambda why: (HFEngine.from_params(params), why)  # noqa: E731
        if not device.is_cuda:
            return hf(f"hf: the run is on the {device.kind}, and vLLM serves from GPUs")
        from qubench.engines.vllm_server import PYTHON_ENV, VLLMServerEngine, unservable_reason

        if self._vllm is None:  # probing runs vLLM's python: once per grid, not once per cell
            if not os.environ.get(PYTHON_ENV) and find_spec("vllm") is None:
                self._vllm = None, f"hf: vLLM is not importable here and ${PYTHON_ENV} names no python that has it"
            else:
                try:
                    found = VLLMServerEngine.from_params(params)
                    self._vllm = (None, "hf: the vLLM found is a CPU build") if found.on_cpu else (found, "")
                except ConfigError as exc:
                    self._vllm = None, f"hf: vLLM is installed but unusable: {exc}"
        vllm, why_not = self._vllm
        if vllm is None:
            return hf(why_not)
        refused = unservable_reason(quant.scheme(), on_cpu=False)
        if refused:
            return hf(f"hf: {refused} (quantizer {quant.name})")
        return vllm, f"vllm: CUDA device and {vllm.version()}"

    # `auto` is replaced by its choice before any evaluation (qubench.stages.run.Plugins.from_spec).
    def lm(self, model: Any, tokenizer: Any):
        raise RuntimeError("engine auto stands for the engine it chooses: call choose() first")

    def token_logprobs(self, model: Any, tokenizer: Any, texts: list[str], max_length: int) -> list[list[float]]:
        raise RuntimeError("engine auto stands for the engine it chooses: call choose() first")
