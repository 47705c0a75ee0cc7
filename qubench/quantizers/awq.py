"""AWQ weight-only INT4 quantization through llm-compressor (AWQModifier + W4A16_ASYM).

AWQ (arXiv 2306.00978) does not change the rounding: it rescales input channels before
it. For each mapping (a norm or projection feeding some Linear layers), it grid-searches
per-channel scales from calibration activations, multiplies the Linear weights' input
columns by them and divides the producing layer's output by them, so the model computes
the same function but its salient channels land on finer grid levels. Then every
targeted weight is rounded to the nearest level with min-max, asymmetric group scales.

So AWQ also changes the RMSNorm weights and the v_proj / up_proj rows that feed a
mapping (in full precision, or rather in their now-quantized form for the projections).
Embeddings and lm_head stay untouched. Mappings come from llm-compressor's registry by
architecture (LlamaForCausalLM has its own entry; unknown architectures fall back to the
Llama-style default, which the library logs).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from qubench.quantizers.llmc import (
    CalibratedConfig,
    CompressedTensorsQuantizer,
    calibration_rows,
    calibration_spec,
    oneshot_calibrated,
)


class AWQConfig(CalibratedConfig):
    symmetric: bool = False  # W4A16_ASYM, the scheme AWQ is published and served with
    duo_scaling: bool | Literal["both"] = Field(True, description="scales from activations and weights (True), "
                                                "activations only (False), or search both")
    n_grid: int = Field(20, ge=2, description="grid points of the per-mapping scale search")

    @model_validator(mode="after")
    def _grid_is_searchable(self):
        # llm-compressor spaces its grid as i / (n - 1) for duo_scaling False, i / (n - 2) for
        # True (plus the identity), and searches n // 2 points twice for "both"
        least = {False: 2, True: 3, "both": 4}[self.duo_scaling]
        if self.n_grid < least:
            raise ValueError(f"n_grid must be at least {least} with duo_scaling={self.duo_scaling!r}")
        return self


@contextlib.contextmanager
def _cpu_safe_activation_cache():
    """llm-compressor's AWQ pins its cached activations (for faster host-to-GPU copies), and
    pinning needs an accelerator: without one torch raises. Pinning only speeds up copies, so
    with no accelerator it is made a no-op for the duration of the fit, and restored after."""
    if torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


class AWQ4bit(CompressedTensorsQuantizer):
    bits = 4
    family = "awq"
    name = "awq-4bit"
    description = ("AWQ weight-only INT4 (W4A16_ASYM), asymmetric, group 128, activation-aware scales "
                   "calibrated on the retain corpus (llm-compressor, compressed-tensors pack-quantized)")
    Config = AWQConfig

    def scheme(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().scheme(),
            "preset": "W4A16_ASYM" if not c.symmetric else "W4A16",
            "duo_scaling": c.duo_scaling,
            "n_grid": c.n_grid,
            "mappings": "llm-compressor registry, by architecture",
            "calibration": calibration_spec(c),
        }

    def _recipe(self, narrow: list[str]):
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQModifier only rescales; the QuantizationModifier after it attaches the scheme
        # AWQ's search evaluates and then rounds the rescaled weights.
        return [
            AWQModifier(duo_scaling=self.config.duo_scaling, n_grid=self.config.n_grid),
            QuantizationModifier(config_groups=self._config_groups(narrow), ignore=list(self.config.ignore)),
        ]

    def _fit(self, model: torch.nn.Module, model_dir: Path, narrow: list[str],
             calibration: list[str]) -> dict[str, Any]:
        from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

        rows, record = calibration_rows(model_dir, calibration, self.config.num_calibration_samples,
                                          self.config.max_seq_length)
        mappings = [m.smooth_layer + " -> " + ", ".join(m.balance_layers)
                    for m in get_layer_mappings_from_model(model)]
        with _cpu_safe_activation_cache():
            oneshot_calibrated(model, self._recipe(narrow), rows)
        return {**record, "awq_mappings": mappings}
