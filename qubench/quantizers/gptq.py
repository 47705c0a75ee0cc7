"""GPTQ weight-only integer quantization through llm-compressor (GPTQModifier).

GPTQ (arXiv 2210.17323) keeps the min-max scales of round-to-nearest but chooses each
weight's grid level column by column, pushing the rounding error of the columns done so
far onto the columns still to do, weighted by the inverse Hessian of the layer's inputs.
The Hessian comes from calibration text: here the task's retain corpus, as the pipeline
passes it (never the forget set). Checkpoints are compressed-tensors, as for RTN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from qubench.quantizers.llmc import (
    CalibratedConfig,
    CompressedTensorsQuantizer,
    calibration_rows,
    calibration_spec,
    oneshot_calibrated,
)


class GPTQConfig(CalibratedConfig):
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = Field(128, ge=1, description="columns updated together in one pass")
    # "static" (llm-compressor's default, alias "weight") orders the columns by Hessian
    # diagonal while keeping contiguous groups, so the checkpoint format is unchanged.
    actorder: Literal["static", "none"] = "static"


class GPTQ(CompressedTensorsQuantizer):
    """Shared implementation; subclasses fix the bit width."""

    family = "gptq"
    Config = GPTQConfig

    def scheme(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().scheme(),
            "preset": f"W{self.bits}A16",
            "dampening_frac": c.dampening_frac,
            "block_size": c.block_size,
            "actorder": c.actorder,
            "calibration": calibration_spec(c),
        }

    def _recipe(self, narrow: list[str]):
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(
            config_groups=self._config_groups(narrow),
            ignore=list(self.config.ignore),
            dampening_frac=self.config.dampening_frac,
            block_size=self.config.block_size,
            actorder=None if self.config.actorder == "none" else self.config.actorder,
        )

    def _fit(self, model: torch.nn.Module, model_dir: Path, narrow: list[str],
             calibration: list[str]) -> dict[str, Any]:
        rows, record = calibration_rows(model_dir, calibration, self.config.num_calibration_samples,
                                          self.config.max_seq_length)
        oneshot_calibrated(model, self._recipe(narrow), rows)
        return record


class GPTQ4bit(GPTQ):
    bits = 4
    name = "gptq-4bit"
    description = ("GPTQ weight-only INT4 (W4A16), symmetric, group 128, calibrated on the retain corpus "
                   "(llm-compressor, compressed-tensors pack-quantized)")


class GPTQ8bit(GPTQ):
    bits = 8
    name = "gptq-8bit"
    description = ("GPTQ weight-only INT8 (W8A16), symmetric, group 128, calibrated on the retain corpus "
                   "(llm-compressor, compressed-tensors pack-quantized)")
