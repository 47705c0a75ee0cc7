"""Weight-only round-to-nearest (RTN) integer quantization through llm-compressor.

The data-free scheme studied in arXiv 2410.16454: every targeted Linear weight is cut into
groups along its input dimension, each group gets its min-max scale, and each
weight is rounded to the nearest grid level. No calibration data is involved, so
the result depends on the weights alone. The checkpoint is a compressed-tensors
folder (the format vLLM serves) with the tokenizer beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qubench.quantizers.llmc import NARROW_GROUP, WEIGHT_OBSERVER, CompressedTensorsQuantizer, IntWeightConfig

__all__ = ["NARROW_GROUP", "WEIGHT_OBSERVER", "RTN", "RTNConfig", "RTN2bit", "RTN3bit", "RTN4bit", "RTN8bit"]


class RTNConfig(IntWeightConfig):
    pass


class RTN(CompressedTensorsQuantizer):
    """Shared implementation; subclasses fix the bit width."""

    family = "rtn"
    Config = RTNConfig

    def _recipe(self, narrow: list[str]):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups=self._config_groups(narrow), ignore=list(self.config.ignore))

    def _fit(self, model: torch.nn.Module, model_dir: Path, narrow: list[str],
             calibration: list[str]) -> dict[str, Any]:
        del calibration  # RTN is data-free: the scales come from the weights alone
        from llmcompressor import oneshot

        oneshot(model=model, recipe=self._recipe(narrow))
        return {}


class RTN2bit(RTN):
    bits = 2
    name = "rtn-2bit"
    description = ("Weight-only round-to-nearest INT2, symmetric, group 128 (llm-compressor, compressed-tensors "
                   "pack-quantized; loads in transformers, vLLM's WNA16 kernels take only 4 and 8 bits)")


class RTN3bit(RTN):
    bits = 3
    name = "rtn-3bit"
    description = ("Weight-only round-to-nearest INT3, symmetric, group 128 (llm-compressor, compressed-tensors "
                   "pack-quantized; loads in transformers, vLLM's WNA16 kernels take only 4 and 8 bits)")


class RTN4bit(RTN):
    bits = 4
    name = "rtn-4bit"
    description = "Weight-only round-to-nearest INT4, symmetric, group 128 (llm-compressor, compressed-tensors pack-quantized)"


class RTN8bit(RTN):
    bits = 8
    name = "rtn-8bit"
    description = "Weight-only round-to-nearest INT8, symmetric, group 128 (llm-compressor, compressed-tensors pack-quantized)"
