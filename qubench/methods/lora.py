"""LoRA unlearning (arXiv 2602.13151): the base weights stay frozen and the whole update
is learned by low-rank adapters (peft), then merged into the weights before saving.

Why it helps under quantization: the merged update B @ A is concentrated in
few directions and is larger per weight than a full fine-tune's diffuse
update, so it is more likely to cross rounding boundaries.

The saved folder is the plain merged model (`merge_and_unload`, then the
loop's usual save_pretrained + tokenizer in the target's dtype): it loads as
the target's own class, with no peft needed and no adapter files.

peft is a core dependency (pure Python on top of torch/transformers), imported
only when this modifier is used.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from qubench.errors import ConfigError
from qubench.methods.train_loop import TrainHook, TrainSession
from qubench.plugin import PluginConfig

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraAdapterConfig(PluginConfig):
    lora_r: Annotated[int, Field(ge=1, description="adapter rank")] = 32
    lora_alpha: Annotated[float, Field(gt=0, description="adapter scaling numerator (scale = alpha / r)")] = 32.0
    lora_dropout: Annotated[float, Field(ge=0, lt=1, description="dropout on the adapters' input")] = 0.05
    lora_target_modules: Annotated[
        list[str], Field(min_length=1, description="names (last component) of the Linear modules that get adapters")
    ] = Field(default_factory=lambda: list(LLAMA_LINEARS))


def _peft():
    # bitsandbytes, which peft imports when present, logs a CPU-kernel warning irrelevant here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import peft
    except ImportError:
        raise ConfigError("the lora modifier needs peft: pip install peft (a qubench dependency; is this a partial install?)") from None
    return peft


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every requested target must name some Linear module: peft only complains when none does."""
    available = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(f"lora_target_modules {missing} match no Linear module of this model; "
                          f"its Linear modules are named: {', '.join(available)}")


def add_adapters(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: list[str]):
    """The peft-wrapped model: base weights frozen, adapters (B = 0, so outputs unchanged) trainable."""
    peft = _peft()
    check_targets(model, targets)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


class LoraAdapters(TrainHook):
    """Modifier `lora`: train adapters instead of the weights, merge them in before saving."""

    name: ClassVar[str] = "lora"
    Config: ClassVar[type[PluginConfig]] = LoraAdapterConfig
    base_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4}  # the paper's adapter learning rate
    description: ClassVar[str] = "LoRA adapters merged into the weights after unlearning (arXiv 2602.13151)"

    def __init__(self, method):
        c = method.config
        self.settings = {"r": c.lora_r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                         "targets": list(c.lora_target_modules)}
        self.stats: dict[str, Any] = {}

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return add_adapters(model, **self.settings)

    def before_training(self, session: TrainSession) -> None:
        trainable = sum(p.numel() for p in session.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in session.model.parameters())
        self.stats = {"trainable_parameters": trainable, "total_parameters_with_adapters": total}

    def after_training(self, session: TrainSession) -> None:
        # Adds B @ A * alpha / r into each target weight and returns the plain base model. The loop hands
        # over the whole model (gathered from the shards under FSDP), so merging needs nothing distributed.
        session.model = session.model.merge_and_unload()

    def summary(self) -> dict[str, Any]:
        return {**self.settings, **self.stats}
