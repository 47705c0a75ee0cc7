"""Weight-only round-to-nearest (RTN) integer quantization through llm-compressor.

The data-free scheme studied in arXiv 2410.16454: every targeted Linear weight is cut into
groups along its input dimension, each group gets its min-max scale, and each
weight is rounded to the nearest grid level. No calibration data is involved, so
the result depends on the weights alone. The checkpoint is a compressed-tensors
folder (the format vLLM serves) with the tokenizer beside it.
"""

from __future__ import annotations

import json
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from qubench.errors import ConfigError
from qubench.plugin import PluginConfig
from qubench.quantizers.base import (
    DEFAULT_IGNORE,
    QuantizedWeights,
    QuantOutcome,
    Quantizer,
    folder_size,
    quantizable_linears,
)

# Layers narrower than the group are quantized per output channel: that is one
# group spanning the whole row, the only grouping such a layer admits. The tiny
# benchmark models (hidden 64) need it with the default group of 128.
NARROW_GROUP = "narrow_per_channel"
WEIGHT_OBSERVER = "memoryless_minmax"


class RTNConfig(PluginConfig):
    group_size: int = Field(128, ge=1, description="weights per scale along the input dimension")
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module names or re: patterns left in full precision")


class RTN(Quantizer):
    """Shared implementation; subclasses fix the bit width."""

    bits: ClassVar[int]
    Config = RTNConfig

    def _args(self, per_channel: bool = False):
        """The QuantizationArgs llm-compressor is given (a fresh object: observers mutate theirs)."""
        from compressed_tensors.quantization import QuantizationArgs

        # min-max scales are what round-to-nearest means (llm-compressor's default for
        # weights too); pinned so the scheme, config.json and step_size all name it.
        common = dict(num_bits=self.bits, type="int", symmetric=self.config.symmetric, observer=WEIGHT_OBSERVER)
        if per_channel:
            return QuantizationArgs(strategy="channel", **common)
        return QuantizationArgs(strategy="group", group_size=self.config.group_size, **common)

    def _is_narrow(self, columns: int, name: str = "weight") -> bool:
        """True when the layer is narrower than a group (quantized per channel); an error when
        the group does not divide it (compressed-tensors and vLLM require divisibility)."""
        g = self.config.group_size
        if columns >= g and columns % g:
            raise ConfigError(
                f"{self.name}: group_size {g} does not divide the {columns} input columns of {name}. "
                "Choose a group_size that divides them, or add the layer to `ignore`."
            )
        return columns < g

    def scheme(self) -> dict[str, Any]:
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.quantization import QuantizationScheme

        weights = self._args()
        fmt = infer_module_format(torch.nn.Linear, QuantizationScheme(targets=["Linear"], weights=weights))
        return {
            "family": "rtn",
            "library": "llmcompressor",
            "library_version": version("llmcompressor"),
            "compressed_tensors_version": version("compressed-tensors"),
            "format": fmt.value,
            "bits": self.bits,
            "group_size": self.config.group_size,
            "symmetric": self.config.symmetric,
            "strategy": "group",
            "narrow_layer_strategy": "channel",  # when in_features < group_size, see NARROW_GROUP
            "observer": weights.observer,
            "weight_only": True,
            "ignore": list(self.config.ignore),
        }

    def _narrow_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of the targeted layers narrower than a group. Checked before any work so that
        an indivisible layer fails fast with its name."""
        return [name for name, module in quantizable_linears(model, self.config.ignore).items()
                if self._is_narrow(module.weight.shape[-1], name)]

    def _recipe(self, narrow: list[str]):
        from compressed_tensors.quantization import QuantizationScheme
        from llmcompressor.modifiers.quantization import QuantizationModifier

        groups = {}
        if narrow:
            # Exact module names take precedence over the "Linear" class target in
            # compressed-tensors (and vLLM) matching, so these layers get the channel scheme.
            # Listed first so the matcher meets the names before the class (else it warns
            # that they matched nothing, which is false).
            groups[NARROW_GROUP] = QuantizationScheme(targets=narrow, weights=self._args(per_channel=True))
        groups["group_0"] = QuantizationScheme(targets=["Linear"], weights=self._args())
        return QuantizationModifier(config_groups=groups, ignore=list(self.config.ignore))

    def quantize(self, model_dir: Path, out_dir: Path, calibration: list[str]) -> QuantOutcome:
        del calibration  # RTN is data-free: the scales come from the weights alone
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        narrow = self._narrow_modules(model)
        oneshot(model=model, recipe=self._recipe(narrow))
        with warnings.catch_warnings():
            # a harmless notice about offloaded modules that llm-compressor emits on CPU
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(out_dir, save_compressed=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
        seconds = time.perf_counter() - start
        written = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]["format"]
        return QuantOutcome(seconds=seconds, size_bytes=folder_size(out_dir),
                            extra={"format": written, "per_channel_modules": narrow})

    def load_quantized(self, out_dir: Path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        with warnings.catch_warnings():
            # transformers warns that our `dequantize` flag overrides the checkpoint's; that is the intent
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            # Dequantize once at load: plain float32 Linear layers holding the exact grid
            # values, so evaluation runs at full speed on CPU with the quantized weights.
            model = AutoModelForCausalLM.from_pretrained(
                out_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
            )
        return model.eval()

    def dequantized_weights(self, out_dir: Path) -> QuantizedWeights:
        model = self.load_quantized(out_dir)
        weights, steps = {}, {}
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            weights[name] = module.weight.detach().clone()
            steps[name] = module.weight_scale.detach().to(torch.float32).clone()
        return QuantizedWeights(weights, steps)

    @torch.no_grad()
    def step_size(self, weight: torch.Tensor) -> torch.Tensor:
        # The very observer oneshot attaches to each weight, so the step is computed by the
        # library's own code (compressed-tensors calculate_qparams), not re-derived here.
        from llmcompressor.observers import Observer

        args = self._args(per_channel=self._is_narrow(weight.shape[-1]))
        observer = Observer.load_from_registry(args.observer, base_name="weight", args=args)
        observer(weight)
        return observer.get_qparams()["scale"]


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
