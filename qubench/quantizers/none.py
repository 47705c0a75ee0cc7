"""The full-precision control: the same pipeline with no quantization step.

With it, any "recovery" a run reports must be noise, which makes it the
baseline that every quantizer's recovery is read against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch

from qubench.plugin import PluginConfig
from qubench.quantizers.base import QuantizedWeights, QuantOutcome, Quantizer, folder_size

DTYPES = {32: torch.float32, 16: torch.bfloat16}


class NoQuantizationConfig(PluginConfig):
    # 16 stores bfloat16, the dtype models are usually served in; it is not lossless
    # (8-bit mantissa), so 32 is the default for an exact control.
    bits: Literal[16, 32] = 32


class NoQuantization(Quantizer):
    name = "none"
    description = "No quantization: the model saved as is in float32 (or bfloat16 with bits=16), the full-precision control"
    Config = NoQuantizationConfig

    def scheme(self) -> dict[str, Any]:
        return {"family": "none", "bits": self.config.bits, "dtype": str(DTYPES[self.config.bits]).removeprefix("torch.")}

    def quantize(self, model_dir: Path, out_dir: Path, calibration: list[str], device=None) -> QuantOutcome:
        del calibration, device  # nothing is fitted: a cast and a copy, in CPU memory
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[self.config.bits])
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
        return QuantOutcome(seconds=time.perf_counter() - start, size_bytes=folder_size(out_dir))

    def load_quantized(self, out_dir: Path, device=None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        placement = device.from_pretrained_kwargs() if device is not None else {}
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **placement).eval()

    def dequantized_weights(self, out_dir: Path) -> QuantizedWeights:
        # No grid, so no steps: the diagnostics then compare values exactly.
        model = self.load_quantized(out_dir)
        return QuantizedWeights({name: m.weight.detach().clone() for name, m in self.quantized_modules(model).items()})

    def step_size(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
