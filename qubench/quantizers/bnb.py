"""bitsandbytes quantizers: FP4 and NF4 (4-bit, blockwise absmax) and LLM.int8 (8-bit, per row).

bitsandbytes quantizes while transformers loads a model with a BitsAndBytesConfig. The
quantized model is then written with save_pretrained: bnb 4-bit and 8-bit serialisation
works on CPU and reloads bit for bit (same packed weights, same logits), so the
checkpoint *is* the quantized model, reproducible from its folder alone, rather than a
full-precision copy plus a recipe that would be re-run at every load. `load_quantized`
returns the model running bitsandbytes' own modules (Linear4bit / Linear8bitLt), as the
seed paper evaluated it; `dequantized_weights` returns the weights those modules use.

Steps. 4-bit weights are code[i] x absmax of their block (64 weights of the flattened
weight by default), with a non-uniform code book (16 FP4 or NF4 values in [-1, 1]).
- `step_size` (the diagnostics' "is the update smaller than a step") is the block absmax
  times the *mean* gap between adjacent code values: the typical distance to the next level.
- `QuantizedWeights.steps` (the diagnostics' "did the weight land on the same level") is the
  block absmax times the *smallest* gap: weight / step then rounds to a distinct integer for
  each code value (checked in the tests), so equal integers mean equal code indices even
  when the two models' block absmax differ.
LLM.int8 weights are round(127 w / absmax_row) x absmax_row / 127, a uniform grid: both
steps are absmax_row / 127, one per row. Its outlier threshold acts on activations at run
time (mixed-precision decomposition), not on the stored weights.

lm_head stays in full precision (transformers' default for bitsandbytes, and what
DEFAULT_IGNORE names for the other quantizers), so there is no `ignore` knob here.

Devices. bitsandbytes quantizes a weight when transformers places it on its device, so the
device map decides where quantization happens and where the model then runs: the run's GPU(s)
(several, through a device map, for a model larger than one), or the CPU, named explicitly: left
unset, transformers would put a bitsandbytes model on the first GPU whenever one is visible,
even for a `--device cpu` run (on a CPU-only machine the explicit map is what it picks itself).
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from qubench.errors import ConfigError
from qubench.plugin import PluginConfig
from qubench.quantizers.base import QuantizedWeights, QuantOutcome, Quantizer, folder_size

BLOCKSIZE_4BIT = 64  # bitsandbytes' default (quantize_4bit, Params4bit); transformers exposes no knob
INT8_LEVELS = 127


MISSING = ("the bitsandbytes quantizers need bitsandbytes, qubench's optional extra 'bnb': "
           "pip install 'qubench[bnb]'")


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"{MISSING} ({exc})") from None
    return bitsandbytes


def _code_gaps(quant_type: str) -> tuple[float, float]:
    """(mean, smallest) gap between adjacent distinct values of the normalised code book."""
    from bitsandbytes.functional import get_4bit_type

    levels = torch.unique(get_4bit_type(quant_type, device="cpu").float())  # sorted; FP4's -0 and 0 merge
    gaps = levels.diff()
    return ((levels[-1] - levels[0]) / gaps.numel()).item(), gaps.min().item()


def _by_block(per_block: torch.Tensor, shape: torch.Size, blocksize: int) -> torch.Tensor:
    """Per-block values of a flattened weight, shaped (rows, blocks per row) when blocks tile
    the rows, else spread to one value per weight (rows, columns): both broadcast with
    `per_weight`, so the diagnostics work on any layer width."""
    rows, cols = shape
    if cols % blocksize == 0:
        return per_block.reshape(rows, cols // blocksize)
    return per_block.repeat_interleave(blocksize)[: rows * cols].reshape(rows, cols)


def _placement(device) -> dict[str, Any]:
    """from_pretrained placement of a bitsandbytes model: the run's GPU(s), else the CPU (explicitly)."""
    if device is not None and device.is_cuda:
        return device.from_pretrained_kwargs()
    return {"device_map": {"": "cpu"}}


def _block_absmax(state) -> torch.Tensor:
    """The absmax of every block as the kernels use it, decoding double quantization
    (absmax stored in 8 bits, blockwise, around their mean) with the library's own code."""
    from bitsandbytes.functional import dequantize_blockwise

    if state.nested:
        return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


class BnbQuantizer(Quantizer):
    """Shared load / save / dequantize logic; subclasses give the BitsAndBytesConfig."""

    bits: ClassVar[int]

    def __init__(self, config: PluginConfig | None = None):
        super().__init__(config)
        if importlib.util.find_spec("bitsandbytes") is None:  # fail before any work, without the import cost
            raise ConfigError(MISSING)

    def _bnb_config(self):
        raise NotImplementedError

    def _library(self) -> dict[str, Any]:
        try:
            bnb_version = version("bitsandbytes")
        except PackageNotFoundError:
            bnb_version = None
        return {"family": "bitsandbytes", "library": "bitsandbytes", "library_version": bnb_version,
                "transformers_version": version("transformers"), "format": "bitsandbytes", "bits": self.bits,
                "weight_only": True, "ignore": ["lm_head"]}

    def quantize(self, model_dir: Path, out_dir: Path, calibration: list[str], device=None) -> QuantOutcome:
        del calibration  # bitsandbytes is data-free: absmax scales come from the weights alone
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _bnb()
        start = time.perf_counter()
        # float32 in, so the absmax statistics are computed from the exact stored weights
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     quantization_config=self._bnb_config(), **_placement(device))
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
        quantized = sorted(self._bnb_modules(model))
        return QuantOutcome(seconds=time.perf_counter() - start, size_bytes=folder_size(out_dir),
                            extra={"format": "bitsandbytes", "quantized_modules": len(quantized)})

    def load_quantized(self, out_dir: Path, device=None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        bnb = _bnb()
        # The bitsandbytes config is read from the checkpoint's config.json; the rest of the
        # model (embeddings, norms, lm_head) is float32.
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **_placement(device)).eval()
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights at the first
                # inference call for a kernel that rounds the block absmax to bfloat16 and
                # multiplies in bfloat16, whatever the compute dtype. Kept off so that results do
                # not depend on the CPU's instruction set: the layer then dequantizes (exactly
                # `dequantized_weights`) and multiplies in the configured compute dtype, as the
                # GPU kernels do.
                module.support_avx512bf16_for_cpu = False
        return model

    def _bnb_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        import bitsandbytes as bnb

        return {name: m for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}

    @torch.no_grad()
    def dequantized_weights(self, out_dir: Path) -> QuantizedWeights:
        model = self.load_quantized(out_dir)
        weights, steps = {}, {}
        for name, module in self._bnb_modules(model).items():
            weights[name], steps[name] = self._dequantize(module)
        return QuantizedWeights(weights, steps)


class Bnb4bitConfig(PluginConfig):
    """No knobs: the exact defaults of BitsAndBytesConfig(load_in_4bit=True)."""


class Bnb4bit(BnbQuantizer):
    bits = 4
    quant_type: ClassVar[str]

    def _bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type)

    def scheme(self) -> dict[str, Any]:
        cfg = self._bnb_config()
        return {**self._library(), "quant_type": self.quant_type, "block_size": BLOCKSIZE_4BIT,
                "scale": "absmax per block", "symmetric": True,
                "compute_dtype": str(cfg.bnb_4bit_compute_dtype).removeprefix("torch."),
                "double_quant": cfg.bnb_4bit_use_double_quant,
                "quant_storage": str(cfg.bnb_4bit_quant_storage).removeprefix("torch."),
                "step": "block absmax x mean code-book gap"}

    def _dequantize(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        from bitsandbytes.functional import dequantize_4bit

        state = module.weight.quant_state
        weight = dequantize_4bit(module.weight.data, state).float()
        _, smallest = _code_gaps(state.quant_type)
        return weight, _by_block(_block_absmax(state) * smallest, weight.shape, state.blocksize)

    @torch.no_grad()
    def step_size(self, weight: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import quantize_4bit

        cfg = self._bnb_config()
        _, state = quantize_4bit(weight.detach().float().contiguous(), blocksize=BLOCKSIZE_4BIT,
                                 compress_statistics=cfg.bnb_4bit_use_double_quant, quant_type=self.quant_type)
        mean_gap, _ = _code_gaps(self.quant_type)
        return _by_block(_block_absmax(state) * mean_gap, weight.shape, BLOCKSIZE_4BIT)


class BnbFP4(Bnb4bit):
    name = "bnb-fp4"
    quant_type = "fp4"
    description = ("bitsandbytes FP4, blockwise absmax over 64 weights: exactly BitsAndBytesConfig(load_in_4bit=True), "
                   "the setting of the seed paper arXiv 2410.16454 (weight-only, float32 compute, no double quant)")
    Config = Bnb4bitConfig


class BnbNF4Config(PluginConfig):
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the dequantized weights in the matmul (float16 is slow on CPU)")
    double_quant: bool = Field(False, description="also quantize the block absmax values (8-bit, blocks of 256)")


class BnbNF4(Bnb4bit):
    name = "bnb-nf4"
    quant_type = "nf4"
    description = ("bitsandbytes NF4 (QLoRA's normal-float code book), blockwise absmax over 64 weights; "
                   "compute dtype and double quantization configurable")
    Config = BnbNF4Config

    def _bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=getattr(torch, self.config.compute_dtype),
                                  bnb_4bit_use_double_quant=self.config.double_quant)


class BnbInt8Config(PluginConfig):
    threshold: float = Field(6.0, ge=0.0, description="activation magnitude above which a feature runs in "
                             "16-bit (LLM.int8 outlier decomposition); 0 disables it")


class BnbInt8(BnbQuantizer):
    bits = 8
    name = "bnb-int8"
    description = ("bitsandbytes LLM.int8: weights int8 with absmax per row, activation outliers above the "
                   "threshold (6.0) in 16-bit")
    Config = BnbInt8Config

    def _bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.config.threshold)

    def scheme(self) -> dict[str, Any]:
        return {**self._library(), "quant_type": "llm.int8", "block_size": None, "scale": "absmax per row",
                "symmetric": True, "threshold": self.config.threshold, "step": "row absmax / 127"}

    def _dequantize(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        from bitsandbytes.functional import int8_vectorwise_dequant

        # The row absmax sits on the weight until the first forward moves it to the module state.
        row_absmax = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        weight = int8_vectorwise_dequant(module.weight.data, row_absmax).float()
        return weight, (row_absmax.float() / INT8_LEVELS).unsqueeze(-1)

    @torch.no_grad()
    def step_size(self, weight: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import int8_vectorwise_quant

        # bitsandbytes quantizes from float16 (Int8Params._quantize), so the statistics are taken there too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, row_absmax, _ = int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
        return (row_absmax.float() / INT8_LEVELS).unsqueeze(-1)
