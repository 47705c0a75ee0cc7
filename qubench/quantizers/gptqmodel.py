"""GPTQ and AWQ through GPT-QModel, an optional second backend (`pip install 'qubench[gptqmodel]'`).

The same two algorithms as the llm-compressor plugins, by another implementation with
other defaults (e.g. GPTQ dampening 0.05, "act group aware" column order, AWQ in 16-bit),
so a result can be checked against a second library. Checkpoints are GPT-QModel's own
formats: GPTQ ("gptq", fp16 scales) and AWQ ("gemm", bf16 model), as vLLM loads them.

- Layers narrower than the group are quantized per output channel (GPT-QModel's per-module
  `dynamic` override, group_size -1), the rule the llm-compressor plugins follow. GPT-QModel's
  AWQ searches its scales with the global group size, so it cannot do that: a group wider
  than a layer is a ConfigError there.
- `load_quantized` returns a float32 model whose quantized Linear layers hold the weights
  GPT-QModel's own unpacking gives (scales taken in float32), as the RTN plugins do.
- Devices: GPT-QModel is given the run's device (`load(..., device=...)`: it quantizes layer by layer
  there) and the CPU otherwise, by name, as before; its portable torch kernels are used on both,
  and `load_quantized` puts the dequantized model on the run's device.
- GPT-QModel is imported only when used; GPTQMODEL_CPU_WORKERS, its CPU thread pool size, is
  set to 2 unless the user set it: its default (half the cores, up to 12) oversubscribes a small
  machine that also runs the evaluation, and fewer than 2 fails inside GPT-QModel 7.6 (its model
  loader's pool asks for 2 workers), so a smaller setting is refused before any work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from qubench.errors import ConfigError
from qubench.plugin import PluginConfig
from qubench.quantizers.base import DEFAULT_IGNORE, QuantizedWeights, QuantOutcome, Quantizer, folder_size
from qubench.quantizers.llmc import calibration_rows, calibration_spec, is_narrow, narrow_modules

CPU_WORKERS_ENV = "GPTQMODEL_CPU_WORKERS"


MISSING = ("the gptqmodel quantizers need GPT-QModel, qubench's optional extra 'gptqmodel': "
           "pip install 'qubench[gptqmodel]'")


def _require_gptqmodel() -> None:
    """Fail at plugin creation, before any work, when the optional package is absent
    (a lookup only: importing GPT-QModel takes seconds and happens when it is used)."""
    if importlib.util.find_spec("gptqmodel") is None:
        raise ConfigError(MISSING)
    workers = os.environ.get(CPU_WORKERS_ENV)
    if workers is not None and (not workers.strip().isdigit() or int(workers) < 2):
        raise ConfigError(f"{CPU_WORKERS_ENV}={workers!r}: GPT-QModel needs at least 2 CPU workers (its model "
                          f"loader asks for 2); unset it (qubench then uses 2) or set it to 2 or more")


def _gptqmodel():
    os.environ.setdefault(CPU_WORKERS_ENV, "2")
    try:
        import gptqmodel
    except ImportError as exc:  # present but unusable, e.g. a broken dependency
        raise ConfigError(f"{MISSING} ({exc})") from None
    return gptqmodel


@contextlib.contextmanager
def _layer_logs_in(folder: Path):
    """GPT-QModel writes per-layer fit logs to ./logs of whatever the current directory is
    (a fixed module-level path); they go with the checkpoint instead, beside the quant_log.csv
    it writes there itself."""
    from gptqmodel.looper import loop_processor

    default = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = default


def _where(device) -> str:
    """GPT-QModel's `device` argument: the run's GPU, else the CPU (by name: it would pick a GPU itself)."""
    return device.torch_device if device is not None and device.is_cuda else "cpu"


class GPTQModelConfig(PluginConfig):
    group_size: int = Field(128, ge=1, description="weights per scale along the input dimension")
    num_calibration_samples: int = Field(128, ge=1, description="retain documents used, in corpus order")
    max_seq_length: int = Field(512, ge=8, description="tokens kept per calibration document")


class GPTQModelGPTQConfig(GPTQModelConfig):
    symmetric: bool = True
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian dampening (GPT-QModel's GPTQ default)")


class GPTQModelAWQConfig(GPTQModelConfig):
    symmetric: bool = False  # AWQ's published scheme: zero point per group


class GPTQModelQuantizer(Quantizer):
    bits: ClassVar[int] = 4
    method: ClassVar[str]
    # GPT-QModel's packing kernels for AWQ take only 16-bit models; its GPTQ runs in float32,
    # which leaves the unquantized embeddings and lm_head exactly as they were.
    fit_dtype: ClassVar[torch.dtype]

    def __init__(self, config: PluginConfig | None = None):
        super().__init__(config)
        _require_gptqmodel()

    def _quantize_config(self, narrow: list[str]):
        raise NotImplementedError

    def scheme(self) -> dict[str, Any]:
        try:
            lib_version = version("gptqmodel")
        except Exception:
            lib_version = None
        c = self.config
        return {"family": self.method, "library": "gptqmodel", "library_version": lib_version,
                "format": "gptq" if self.method == "gptq" else "gemm", "bits": self.bits,
                "group_size": c.group_size, "symmetric": c.symmetric, "strategy": "group",
                "narrow_layer_strategy": "channel" if self.method == "gptq" else "error",
                "weight_only": True, "ignore": list(DEFAULT_IGNORE),
                "fit_dtype": str(self.fit_dtype).removeprefix("torch."), "calibration": calibration_spec(c)}

    def _narrow(self, model_dir: Path) -> list[str]:
        from transformers import AutoConfig, AutoModelForCausalLM

        # the layer widths, from a weightless copy of the architecture
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        narrow = narrow_modules(self.name, self.config.group_size, skeleton, DEFAULT_IGNORE)
        if narrow and self.method == "awq":
            raise ConfigError(f"{self.name}: group_size {self.config.group_size} is wider than {len(narrow)} layers "
                              f"(e.g. {narrow[0]}); GPT-QModel's AWQ needs a group that divides every layer. "
                              "Choose a smaller group_size, or use awq-4bit (llm-compressor).")
        return narrow

    def quantize(self, model_dir: Path, out_dir: Path, calibration: list[str], device=None) -> QuantOutcome:
        gptqmodel = _gptqmodel()
        from transformers import AutoTokenizer

        start = time.perf_counter()
        narrow = self._narrow(model_dir)
        rows, record = calibration_rows(model_dir, calibration, self.config.num_calibration_samples,
                                        self.config.max_seq_length)
        model = gptqmodel.GPTQModel.load(str(model_dir), self._quantize_config(narrow), device=_where(device),
                                         dtype=self.fit_dtype)
        with _layer_logs_in(Path(out_dir) / "gptqmodel_logs"):
            # Our rows are already chosen and truncated: keep every one (GPT-QModel drops rows
            # shorter than 10 tokens by default) and use its portable torch kernels on CPU.
            model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=1,
                           calibration_data_min_length=2, backend=gptqmodel.BACKEND.TORCH)
        model.save(str(out_dir))
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
        return QuantOutcome(seconds=time.perf_counter() - start, size_bytes=folder_size(out_dir),
                            extra={"format": self.scheme()["format"], "per_channel_modules": narrow, **record})

    def _load(self, out_dir: Path, device=None) -> tuple[torch.nn.Module, QuantizedWeights]:
        """The float32 model with dequantized Linear layers, and those weights with their scales."""
        gptqmodel = _gptqmodel()
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
        from safetensors.torch import load_file

        loaded = gptqmodel.GPTQModel.load(str(out_dir), device=_where(device), backend=gptqmodel.BACKEND.TORCH)
        model = loaded.model
        weights, steps = {}, {}
        for name, module in list(model.named_modules()):
            if not isinstance(module, BaseQuantLinear):
                continue
            weight, scale = self._dequantize(module)
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     device=weight.device)
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
            weights[name], steps[name] = weight.clone(), scale
        model = model.float()
        # GPT-QModel loads in 16 bits; the unquantized tensors are read back as stored
        stored = {}
        for shard in sorted(Path(out_dir).glob("*.safetensors")):
            stored.update(load_file(shard))
        params = model.state_dict()
        model.load_state_dict({k: v.float() for k, v in stored.items() if k in params and v.shape == params[k].shape
                               and v.is_floating_point()}, strict=False)  # load_state_dict copies onto each device
        model.config.quantization_config = None
        return model.eval(), QuantizedWeights(weights, steps)

    def load_quantized(self, out_dir: Path, device=None) -> torch.nn.Module:
        return self._load(out_dir, device)[0]

    def dequantized_weights(self, out_dir: Path) -> QuantizedWeights:
        return self._load(out_dir)[1]

    @torch.no_grad()
    def step_size(self, weight: torch.Tensor) -> torch.Tensor:
        """GPT-QModel's min-max scale of each group of the weight as given. GPTQ fits each group's
        scale on the weights as error feedback has left them, and AWQ on channel-rescaled
        weights, so their checkpoint scales differ somewhat from this."""
        _gptqmodel()
        from gptqmodel.quantization.quantizer import Quantizer as GroupQuantizer

        columns = weight.shape[-1]
        group = columns if is_narrow(self.name, self.config.group_size, columns) else self.config.group_size
        quantizer = GroupQuantizer(self._quantize_config([]))
        quantizer.configure(perchannel=True)
        scales = []
        for start in range(0, columns, group):
            quantizer.find_params(weight[:, start:start + group].float(), weight=True)
            scales.append(quantizer.scale.reshape(-1, 1).clone())
        return torch.cat(scales, dim=1)


class GPTQModelGPTQ4bit(GPTQModelQuantizer):
    method = "gptq"
    fit_dtype = torch.float32
    name = "gptqmodel-gptq-4bit"
    description = ("GPTQ weight-only INT4, symmetric, group 128, calibrated on the retain corpus "
                   "(GPT-QModel, gptq format; optional extra [gptqmodel])")
    Config = GPTQModelGPTQConfig

    def scheme(self) -> dict[str, Any]:
        return {**super().scheme(), "damp_percent": self.config.damp_percent, "act_group_aware": True}

    def _quantize_config(self, narrow: list[str]):
        from gptqmodel.quantization.config import GPTQConfig

        # act_group_aware orders columns within groups, so a per-channel layer must turn it off
        dynamic = {name: {"group_size": -1, "act_group_aware": False} for name in narrow} or None
        return GPTQConfig(bits=self.bits, group_size=self.config.group_size, sym=self.config.symmetric,
                          damp_percent=self.config.damp_percent, dynamic=dynamic, offload_to_disk=False)

    def _dequantize(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        # GPT-QModel's own unpacking (the class method: the instance's is wrapped in
        # torch.compile), with the scales in float32 so the products are exact
        module.scales = module.scales.float()
        weight = type(module).dequantize_weight(module).T.float().contiguous()
        return weight, module.scales.T.float().contiguous()


class GPTQModelAWQ4bit(GPTQModelQuantizer):
    method = "awq"
    fit_dtype = torch.bfloat16
    name = "gptqmodel-awq-4bit"
    description = ("AWQ weight-only INT4, asymmetric, group 128, calibrated on the retain corpus "
                   "(GPT-QModel, gemm format, bfloat16 model; optional extra [gptqmodel])")
    Config = GPTQModelAWQConfig

    def _quantize_config(self, narrow: list[str]):
        from gptqmodel.quantization.config import AWQConfig

        return AWQConfig(bits=self.bits, group_size=self.config.group_size, sym=self.config.symmetric,
                         offload_to_disk=False)

    def _dequantize(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        scales = module.scales.float()
        weight = dequantize_gemm(module.qweight, module.qzeros, scales, module.bits, module.group_size)
        return weight.T.float().contiguous(), scales.T.contiguous()
