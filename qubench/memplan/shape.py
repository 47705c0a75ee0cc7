"""A model's shape from its config alone: the model is built on the meta device (accelerate's
`init_empty_weights`), so no weight is loaded or even allocated, and every count below is the one
the real model has (tied embeddings counted once, as `model.parameters()` does)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from qubench.errors import ConfigError, QubenchError


class ConfigUnavailable(QubenchError):
    """The model's config cannot be read here (e.g. a hub ID offline): no plan can be made."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


def parse_size(text: str) -> int:
    """'24GiB', '80GB', '1.5TiB', '512MiB' or plain bytes -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{text!r} is not a memory size; write e.g. 24GiB, 80GB, 512MiB (GB = 10^9 bytes, "
                          "GiB = 2^30)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"memory size {text!r} must be positive")
    return value


class Linear(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    inputs: int
    outputs: int

    @property
    def params(self) -> int:
        return self.inputs * self.outputs

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


class ModelShape(BaseModel):
    """What the memory arithmetic needs to know about a causal LM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    params: int                  # every parameter, tied ones once
    embed_params: int            # the input embedding
    head_params: int             # lm_head, 0 when tied to the embedding
    layers: int                  # repeated decoder blocks (the model's `_no_split_modules`)
    layer_params: int            # parameters of one decoder block
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int                  # key (= value) width: kv heads x head dim (GQA makes it < hidden)
    vocab: int
    context: int                 # max_position_embeddings
    saved_bytes: int             # bytes per parameter of the checkpoint's dtype (config `dtype`)
    linears: tuple[Linear, ...]  # every nn.Linear, lm_head included

    @property
    def quantizable(self) -> tuple[Linear, ...]:
        """The Linear layers weight-only schemes round: all but lm_head (quantizers.base.DEFAULT_IGNORE)."""
        return tuple(lin for lin in self.linears if lin.leaf != "lm_head")

    @property
    def layer_linears(self) -> tuple[Linear, ...]:
        """The Linear layers of the first decoder block (the unit a sequential quantizer onloads)."""
        first = re.compile(r"(^|\.)0\.")
        return tuple(lin for lin in self.quantizable if first.search(lin.name))

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """Adapter parameters peft adds: lora_A (rank x in) + lora_B (out x rank) per targeted Linear."""
        return sum(rank * (lin.inputs + lin.outputs) for lin in self.linears if lin.leaf in targets)


def shape_of(config) -> ModelShape:
    """Build the model of `config` on the meta device and read its shape."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in model.modules() if type(m).__name__ in set(getattr(model, "_no_split_modules", None) or ())]
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    linears = tuple(Linear(name=n, inputs=m.in_features, outputs=m.out_features)
                    for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", embed.shape[1]))
    heads = int(getattr(text, "num_attention_heads", 1))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = str(dtype).removeprefix("torch.")
    return ModelShape(
        architecture=type(model).__name__,
        params=params,
        embed_params=embed.numel(),
        head_params=0 if tied or head is None else head.weight.numel(),
        layers=len(blocks) or int(getattr(text, "num_hidden_layers", 1)),
        layer_params=sum(p.numel() for p in blocks[0].parameters()) if blocks else params,
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        heads=heads,
        kv_dim=int(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=int(embed.shape[0]),
        context=int(getattr(text, "max_position_embeddings", None) or 2048),
        saved_bytes=DTYPE_BYTES.get(dtype, 4),
        linears=linears,
    )


def config_of(ref: str | Path):
    """The config of a model folder or hub ID, without its weights. A hub ID reads the Hugging Face
    cache first and downloads only config.json when it is not there; offline that fails with advice."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(ref))
    except Exception as exc:  # not a folder with config.json, unknown ID, no network, gated repo
        raise ConfigUnavailable(
            f"the memory plan needs the config of model {str(ref)!r} and could not read it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pass --model with a local folder holding its "
            "config.json, or fetch the config alone: "
            f"huggingface-cli download {ref} config.json") from None
