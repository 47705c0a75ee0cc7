"""What the llm-compressor quantizers (RTN, GPTQ, AWQ) share: integer weight-only schemes
written as compressed-tensors checkpoints (the format vLLM serves).

- the group-size rule: layers narrower than a group are quantized per output channel,
  layers wider than a group must be divisible by it;
- the scheme record, the checkpoint writer and reader, the dequantized weights and steps;
- the calibration set GPTQ and AWQ are fitted on, tokenised once and fingerprinted;
- the device the fit runs on (`execution_device`).

Devices, the way llm-compressor works at scale: the model is loaded in CPU memory, and oneshot's
pipelines onload each piece to the execution device while they work on it (RTN's data-free
pipeline runs its per-weight work there; GPTQ's and AWQ's sequential pipeline traces the model into
decoder-layer subgraphs, onloads one layer at a time, runs the calibration batches through it, fits
it, offloads it back and keeps the activations between layers in CPU memory). So a model larger
than one GPU is quantized with one GPU's worth of memory for a layer and its Hessians. The
checkpoint is then written from CPU memory as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from qubench.errors import ConfigError, DataError
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
# min-max scales: what round-to-nearest means, llm-compressor's default for weights, and
# the scales GPTQ and AWQ start from (GPTQ keeps them and fits the levels; AWQ searches
# the channel scaling that makes them fit best). Pinned so scheme, config.json and
# step_size all name it.
WEIGHT_OBSERVER = "memoryless_minmax"


def is_narrow(plugin: str, group_size: int, columns: int, name: str = "weight") -> bool:
    """True when a layer is narrower than a group (quantized per channel); an error when the
    group does not divide it (compressed-tensors, vLLM and the GPTQ/AWQ kernels require it)."""
    if columns >= group_size and columns % group_size:
        raise ConfigError(
            f"{plugin}: group_size {group_size} does not divide the {columns} input columns of {name}. "
            "Choose a group_size that divides them, or add the layer to `ignore`."
        )
    return columns < group_size


def narrow_modules(plugin: str, group_size: int, model: torch.nn.Module, ignore) -> list[str]:
    """Names of the targeted layers narrower than a group. Checked before any work so that
    an indivisible layer fails fast with its name."""
    return [name for name, module in quantizable_linears(model, ignore).items()
            if is_narrow(plugin, group_size, module.weight.shape[-1], name)]


class IntWeightConfig(PluginConfig):
    """The knobs every llm-compressor integer weight-only scheme has."""

    group_size: int = Field(128, ge=1, description="weights per scale along the input dimension")
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module names or re: patterns left in full precision")


class CalibratedConfig(IntWeightConfig):
    """Calibration knobs of the data-dependent schemes (GPTQ, AWQ)."""

    num_calibration_samples: int = Field(128, ge=1, description="retain documents used, in corpus order")
    max_seq_length: int = Field(512, ge=8, description="tokens kept per calibration document")


class CompressedTensorsQuantizer(Quantizer):
    """Integer weight-only quantization through llm-compressor, saved as compressed-tensors.
    Subclasses say how the model is fitted (`_fit`) and what else the scheme records."""

    bits: ClassVar[int]
    family: ClassVar[str]
    Config = IntWeightConfig

    def _args(self, per_channel: bool = False):
        """The QuantizationArgs llm-compressor is given (a fresh object: observers mutate theirs)."""
        from compressed_tensors.quantization import QuantizationArgs

        common = dict(num_bits=self.bits, type="int", symmetric=self.config.symmetric, observer=WEIGHT_OBSERVER)
        if per_channel:
            return QuantizationArgs(strategy="channel", **common)
        return QuantizationArgs(strategy="group", group_size=self.config.group_size, **common)

    def _is_narrow(self, columns: int, name: str = "weight") -> bool:
        return is_narrow(self.name, self.config.group_size, columns, name)

    def _narrow_modules(self, model: torch.nn.Module) -> list[str]:
        return narrow_modules(self.name, self.config.group_size, model, self.config.ignore)

    def _config_groups(self, narrow: list[str]) -> dict:
        from compressed_tensors.quantization import QuantizationScheme

        groups = {}
        if narrow:
            # Exact module names take precedence over the "Linear" class target in
            # compressed-tensors (and vLLM) matching, so these layers get the channel scheme.
            # Listed first so the matcher meets the names before the class (else it warns
            # that they matched nothing, which is false).
            groups[NARROW_GROUP] = QuantizationScheme(targets=narrow, weights=self._args(per_channel=True))
        groups["group_0"] = QuantizationScheme(targets=["Linear"], weights=self._args())
        return groups

    def scheme(self) -> dict[str, Any]:
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.quantization import QuantizationScheme

        weights = self._args()
        fmt = infer_module_format(torch.nn.Linear, QuantizationScheme(targets=["Linear"], weights=weights))
        return {
            "family": self.family,
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

    def _fit(self, model: torch.nn.Module, model_dir: Path, narrow: list[str],
             calibration: list[str]) -> dict[str, Any]:
        """Run llm-compressor's oneshot on `model` in place; return what QuantOutcome.extra records."""
        raise NotImplementedError

    def quantize(self, model_dir: Path, out_dir: Path, calibration: list[str], device=None) -> QuantOutcome:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        # In CPU memory whatever the device: oneshot onloads what it works on (see the module docstring).
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        narrow = self._narrow_modules(model)
        with execution_device(device):
            extra = self._fit(model, Path(model_dir), narrow, calibration)
        with warnings.catch_warnings():
            # a harmless notice about offloaded modules that llm-compressor emits on CPU
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(out_dir, save_compressed=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
        seconds = time.perf_counter() - start
        written = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]["format"]
        return QuantOutcome(seconds=seconds, size_bytes=folder_size(out_dir),
                            extra={"format": written, "per_channel_modules": narrow, **extra})

    def load_quantized(self, out_dir: Path, device=None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        with warnings.catch_warnings():
            # transformers warns that our `dequantize` flag overrides the checkpoint's; that is the intent
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            # Dequantize once at load: plain float32 Linear layers holding the exact grid
            # values, so evaluation runs at full speed on CPU with the quantized weights (on a GPU
            # too; the low-bit kernels are the `vllm` engine's part).
            model = AutoModelForCausalLM.from_pretrained(
                out_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True),
                **(device.from_pretrained_kwargs() if device is not None else {}))
        return model.eval()

    def dequantized_weights(self, out_dir: Path) -> QuantizedWeights:
        # With a zero point (asymmetric) a weight is (level - zero point) x scale: still an
        # integer times the scale, so the scale is the step the diagnostics divide by.
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


#: The llm-compressor modules that ask `get_main_device()` where oneshot's work runs.
_MAIN_DEVICE_USERS = ("llmcompressor.pipelines.sequential.pipeline", "llmcompressor.pipelines.data_free.pipeline")


@contextlib.contextmanager
def execution_device(device=None):
    """Run llm-compressor's oneshot on `device` (a qubench.device.Device; None: the CPU).

    llm-compressor 0.14 has no argument for it: its pipelines onload to `get_main_device()`, the
    first accelerator whenever one is visible. That would put a `--device cpu` run on a GPU, and
    a `--device cuda:1` run on GPU 0; so, for the length of the fit, the pipelines are given the run's
    device instead (on a CPU-only machine that is the very device they would pick themselves)."""
    import importlib

    from compressed_tensors.utils import patch_attr

    target = torch.device(device.torch_device if device is not None else "cpu")
    with contextlib.ExitStack() as stack:
        for name in _MAIN_DEVICE_USERS:
            stack.enter_context(patch_attr(importlib.import_module(name), "get_main_device", lambda: target))
        yield target


def calibration_rows(model_dir: Path, texts: list[str], num_samples: int,
                     max_seq_length: int) -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids of the calibration set, and its record for QuantOutcome.extra.

    The first `num_samples` non-empty documents in the order given, each truncated to
    `max_seq_length` tokens: a deterministic choice (llm-compressor would otherwise draw a
    random, unseeded subset), fingerprinted by the token ids themselves so a result names
    the exact data its quantizer was fitted on. Shared by every calibrated backend.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for text in texts:
        if len(rows) == num_samples:
            break
        if not text.strip():
            continue
        ids = tokenizer(text, truncation=True, max_length=max_seq_length)["input_ids"]
        if len(ids) > 1:  # a lone BOS carries no activation statistics worth fitting
            rows.append(ids)
    if not rows:
        raise DataError("calibration needs at least one non-empty text; the task's retain corpus gave none")
    digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]
    record = {
        "calibration_hash": digest,
        "calibration_samples": len(rows),
        "calibration_tokens": sum(map(len, rows)),
        "calibration_max_seq_length": max_seq_length,
        "calibration_longest": max(map(len, rows)),
    }
    return rows, record


def calibration_spec(config: CalibratedConfig) -> dict[str, Any]:
    """How the calibration set is chosen, as the scheme records it."""
    return {"source": "retain corpus", "num_samples": config.num_calibration_samples,
            "max_seq_length": config.max_seq_length, "selection": "first non-empty documents, in order"}


def oneshot_calibrated(model: torch.nn.Module, recipe, rows: list[list[int]]) -> None:
    """llm-compressor's oneshot over exactly `rows` (a datasets.Dataset of input_ids, which
    oneshot takes as already tokenised), in a fixed order, one sample a batch."""
    from datasets import Dataset
    from llmcompressor import oneshot

    _ensure_metric_log_level()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    oneshot(model=model, recipe=recipe, dataset=dataset, num_calibration_samples=len(rows),
            shuffle_calibration_samples=False, batch_size=1, max_seq_length=None)


def _ensure_metric_log_level() -> None:
    """GPTQ logs its per-layer error and time at llm-compressor's custom loguru level "METRIC",
    which llm-compressor registers only when its logging is enabled; with
    LLM_COMPRESSOR_LOG_DISABLED=true (as the qubench CLI sets it) that log call raises
    "Level 'METRIC' does not exist". Registering the level (same number) lets the call pass;
    the messages stay silenced, as the llmcompressor logger itself remains disabled."""
    from loguru import logger

    try:
        logger.level("METRIC")
    except ValueError:
        logger.level("METRIC", no=38)
