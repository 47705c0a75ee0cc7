"""The one training loop every loss-based unlearning method shares.

A method only supplies an objective: (model, frozen reference or None,
forget batch, retain batch or None) -> {"loss": tensor to minimise, **terms}.
The loop owns everything else so that methods differ only in their loss:
AdamW at a constant learning rate (optional linear warmup), gradient
accumulation, gradient-norm clipping, seeded data order, a per-step log,
divergence detection and saving in the target's own dtype.

Modifiers that change *how* a loss is optimised rather than *what* it is
(the quantization-robust methods: a logit hinge, a saliency mask, LoRA
adapters) plug in as `TrainHook`s: they see the session before the first
step (and may wrap or freeze the model), may add loss terms per micro-batch,
see the optimizer once it exists, and may replace the model before it is
saved. A run without hooks is exactly the plain loop.

Training runs in float32 whatever dtype the target was saved in: CPU
half-precision training is slow and loses the small updates unlearning makes;
the result is cast back to the saved dtype so that the quantizers see the
same storage format for target and unlearned model.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qubench.errors import QubenchError
from qubench.methods.base import UnlearnContext, UnlearnMethod, UnlearnOutcome
from qubench.methods.data import (
    TokenBatch,
    batches_per_epoch,
    chunk_documents,
    default_max_len,
    forget_retain_batches,
)
from qubench.methods.losses import kl_to_reference, retain_nll_loss
from qubench.plugin import PluginConfig
from qubench.progress import Steps


class TrainingError(QubenchError):
    """Training diverged (a non-finite loss or gradient); the message says where and what to change."""


# Field types, shared so every method's config validates the same way. The
# defaults live in each method's own module (ga.py, npo.py), in one place.
LearningRate = Annotated[float, Field(gt=0, description="AdamW learning rate (constant after warmup)")]
Epochs = Annotated[int, Field(ge=1, description="passes over the forget set")]
BatchSize = Annotated[int, Field(ge=1, description="forget windows per micro-batch (retain batch matches)")]
GradAccum = Annotated[int, Field(ge=1, description="micro-batches accumulated per optimizer step")]
MaxLen = Annotated[
    int | None, Field(ge=2, description="tokens per window; None = min(model context, 256)")
]
WarmupSteps = Annotated[int, Field(ge=0, description="optimizer steps of linear learning-rate warmup")]
MaxGradNorm = Annotated[float | None, Field(gt=0, description="clip the gradient norm; None = no clipping")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW decoupled weight decay")]
MaxSteps = Annotated[int | None, Field(ge=1, description="stop after this many optimizer steps")]
RetainWeight = Annotated[float, Field(ge=0, description="alpha: weight of the retain term")]


class TrainConfig(PluginConfig):
    """Hyper-parameters of the shared loop. No defaults here: see each method's config."""

    lr: LearningRate
    epochs: Epochs
    batch_size: BatchSize
    grad_accum: GradAccum
    max_len: MaxLen
    warmup_steps: WarmupSteps
    max_grad_norm: MaxGradNorm
    weight_decay: WeightDecay
    max_steps: MaxSteps


Objective = Callable[[torch.nn.Module, torch.nn.Module | None, TokenBatch, TokenBatch | None], dict]


@dataclass
class TrainSession:
    """What the loop has built before the first step. Hooks read it; `model` they may replace
    (LoRA wraps it before training and merges the adapters back before saving)."""

    ctx: UnlearnContext
    config: TrainConfig
    tokenizer: Any
    model: torch.nn.Module                # float32, train mode, the target's weights until step 1
    reference: torch.nn.Module | None     # frozen copy of the target, when the loss needs one
    forget: list[list[int]]               # the forget windows (token ids) the loop iterates over
    retain: list[list[int]] | None
    pad_id: int


class TrainHook:
    """An extension of the shared loop; every method is a no-op here.

    The loop calls, in this order: `before_training` (after the model, the
    reference and the windows exist), `optimizer_ready` (once), `extra_terms`
    (every micro-batch), `after_training` (before the model is cast and saved),
    and records `summary()` in the outcome's `extra` under the hook's `name`.
    """

    name: ClassVar[str] = ""

    def before_training(self, session: TrainSession) -> None:
        pass

    def optimizer_ready(self, optimizer: torch.optim.Optimizer, session: TrainSession) -> None:
        pass

    def extra_terms(self, model: torch.nn.Module, forget: TokenBatch) -> dict[str, torch.Tensor]:
        """Terms to log for this forget micro-batch; the one under "loss", if any, is added to the loss."""
        return {}

    def after_training(self, session: TrainSession) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


def _with_hook_terms(terms: dict, hooks: Sequence[TrainHook], model, forget: TokenBatch) -> dict:
    for hook in hooks:
        extra = dict(hook.extra_terms(model, forget))
        if "loss" in extra:
            terms = {**terms, "loss": terms["loss"] + extra.pop("loss")}
        clash = set(extra) & set(terms)
        if clash:  # a silent overwrite would log one term under another's name
            raise ValueError(f"hook {hook.name!r} logs terms that already exist: {sorted(clash)}")
        terms = {**terms, **extra}
    return terms


def saved_dtype(model_dir) -> torch.dtype:
    """The dtype the model folder was saved in (config `dtype`, formerly `torch_dtype`)."""
    config = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_model(model_dir, trainable: bool) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


def _learning_rate(config: TrainConfig, step_index: int) -> float:
    if config.warmup_steps and step_index < config.warmup_steps:
        return config.lr * (step_index + 1) / config.warmup_steps
    return config.lr


def _check_finite(values: dict[str, float], what: str, step: int, epoch: int, lr: float) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        raise TrainingError(
            f"training diverged: non-finite {what} at optimizer step {step} (epoch {epoch + 1}): "
            f"{shown}. Lower the learning rate (lr={lr:g}), set max_grad_norm, or take fewer steps."
        )


def _check_finite_weights(model: torch.nn.Module, steps: int) -> None:
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(
            f"training diverged: non-finite weights after {steps} optimizer step(s) in {len(bad)} tensor(s), "
            f"e.g. {bad[0]}. Lower the learning rate, set max_grad_norm, or take fewer steps."
        )


def train(
    ctx: UnlearnContext,
    config: TrainConfig,
    objective: Objective,
    *,
    needs_reference: bool,
    needs_retain: bool,
    label: str = "unlearning",
    hooks: Sequence[TrainHook] = (),
) -> UnlearnOutcome:
    """Optimise `objective` (plus any hook terms) over the forget set, save model + tokenizer to `ctx.out_dir`."""
    started = time.perf_counter()
    torch.manual_seed(ctx.seed)  # dropout, if the architecture has any
    data_order = torch.Generator().manual_seed(ctx.seed)

    tokenizer = AutoTokenizer.from_pretrained(ctx.target_dir)
    model = _load_model(ctx.target_dir, trainable=True)
    reference = _load_model(ctx.target_dir, trainable=False) if needs_reference else None

    max_len = config.max_len or default_max_len(model.config)
    forget = chunk_documents(ctx.data.forget, tokenizer, max_len)
    retain = chunk_documents(ctx.data.retain, tokenizer, max_len) if needs_retain else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    session = TrainSession(ctx, config, tokenizer, model, reference, forget, retain, pad_id)
    for hook in hooks:
        hook.before_training(session)
    model = session.model

    micro_per_epoch = batches_per_epoch(len(forget), config.batch_size)
    total_steps = config.epochs * math.ceil(micro_per_epoch / config.grad_accum)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter of the model is frozen")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    for hook in hooks:
        hook.optimizer_ready(optimizer, session)
    clip_at = config.max_grad_norm if config.max_grad_norm is not None else math.inf

    log: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    step = 0
    batches = forget_retain_batches(forget, retain, config.batch_size, config.epochs, data_order, pad_id)
    with Steps(label, total_steps, ctx.progress) as progress:
        for index, (epoch, forget_batch, retain_batch) in enumerate(batches):
            # Accumulation groups never straddle epochs; the last group of an epoch may be short,
            # and each micro-batch is weighted by 1/(its group's size) so a step is always a mean.
            pos = index % micro_per_epoch
            group_size = min(config.grad_accum, micro_per_epoch - (pos - pos % config.grad_accum))
            lr = _learning_rate(config, step)

            terms = objective(model, reference, forget_batch, retain_batch)
            if hooks:
                terms = _with_hook_terms(terms, hooks, model, forget_batch)
            values = {k: float(v.detach()) for k, v in terms.items()}
            _check_finite(values, "loss", step + 1, epoch, lr)
            (terms["loss"] / group_size).backward()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / group_size

            if pos % config.grad_accum != group_size - 1:
                continue
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_at))
            _check_finite({"grad_norm": grad_norm}, "gradient", step + 1, epoch, lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            entry = {"step": step, "epoch": epoch + 1, "lr": lr, **sums, "grad_norm": grad_norm}
            log.append(entry)
            sums = {}
            progress.advance(1, f"loss {entry['loss']:.4f}")
            if step >= total_steps:
                break

    _check_finite_weights(model, step)  # the last step's update is checked by no later loss
    for hook in hooks:
        hook.after_training(session)
    model = session.model
    model.to(saved_dtype(ctx.target_dir))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)

    not_losses = ("step", "epoch", "lr", "grad_norm")
    final = {k: v for k, v in log[-1].items() if k not in not_losses} if log else {}
    return UnlearnOutcome(
        steps=step,
        log=log,
        final_losses=final,
        extra={
            "max_len": max_len,
            "forget_windows": len(forget),
            "retain_windows": len(retain) if retain is not None else 0,
            "seconds": time.perf_counter() - started,
            **{hook.name: hook.summary() for hook in hooks},
        },
    )


class LossBasedMethod(UnlearnMethod):
    """A method defined by its forget term plus an optional retain regulariser.

    loss = forget term + alpha * retain term, where the retain term is the
    retain NLL ("gdr") or KL(target || model) on retain data ("klr").
    """

    Config: ClassVar[type[TrainConfig]] = TrainConfig
    retain_term: ClassVar[Literal["gdr", "klr"] | None] = None
    forget_needs_reference: ClassVar[bool] = False  # NPO compares with the frozen target

    @abstractmethod
    def forget_loss(self, model, reference, forget: TokenBatch) -> torch.Tensor:
        """The term that removes the forget set."""

    def train_hooks(self) -> list[TrainHook]:
        """Fresh hooks for one run of the loop (composed methods add their modifiers here)."""
        return []

    def loss_terms(self, model, reference, forget: TokenBatch, retain: TokenBatch | None) -> dict:
        terms = {"forget": self.forget_loss(model, reference, forget)}
        loss = terms["forget"]
        if self.retain_term == "gdr":
            terms["retain"] = retain_nll_loss(model, retain)
        elif self.retain_term == "klr":
            terms["retain"] = kl_to_reference(model, reference, retain)
        if "retain" in terms:
            loss = loss + self.config.alpha * terms["retain"]
        return {"loss": loss, **terms}

    def unlearn(self, ctx: UnlearnContext) -> UnlearnOutcome:
        return train(
            ctx,
            self.config,
            self.loss_terms,
            needs_reference=self.forget_needs_reference or self.retain_term == "klr",
            needs_retain=self.retain_term is not None,
            label=f"unlearning ({self.name})",
            hooks=self.train_hooks(),
        )
