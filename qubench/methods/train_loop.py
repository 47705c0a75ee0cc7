"""The one training loop every loss-based unlearning method shares.

A method only supplies an objective: (model, frozen reference or None,
forget batch, retain batch or None) -> {"loss": tensor to minimise, **terms}.
The loop owns everything else so that methods differ only in their loss:
AdamW at a constant learning rate (optional linear warmup), gradient
accumulation, gradient-norm clipping, seeded data order, a per-step log,
divergence detection and saving in the target's own dtype.

It runs through Hugging Face Accelerate (`qubench.methods.runtime`): on the
CPU, one GPU, or N processes (DDP, FSDP2, DeepSpeed ZeRO-3). Every process
builds the same micro-batches of `batch_size` windows and trains on its own
rows of each, and every mean in a loss is taken over the whole micro-batch
(`data.ShareOf`), so an optimizer step sees exactly the windows, and the
gradient, of the one-process run: the result does not depend on the process
count beyond float rounding. Objectives should build their means with
`qubench.methods.losses.divisor` (as the built-in losses do); a plain
per-batch mean still trains, but under data parallelism it becomes an
average of per-rank means, which weighs tokens differently when ranks hold
different token counts.

Modifiers that change *how* a loss is optimised rather than *what* it is
(the quantization-robust methods: a logit hinge, a saliency mask, LoRA
adapters) plug in as `TrainHook`s: they see the session before the first
step (and may wrap or freeze the model), may add loss terms per micro-batch,
see the optimizer once it exists, and may replace the model before it is
saved. A run without hooks is exactly the plain loop.

Master weights are float32 whatever dtype the target was saved in (the
`precision` parameter only chooses the compute dtype: fp32, or bf16 on GPUs);
the result is cast back to the saved dtype so that the quantizers see the
same storage format for target and unlearned model.
"""

from __future__ import annotations

import math
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qubench.errors import ConfigError, QubenchError
from qubench.methods.base import UnlearnContext, UnlearnMethod, UnlearnOutcome
from qubench.methods.data import (
    TokenBatch,
    batches_per_epoch,
    chunk_documents,
    default_max_len,
    forget_retain_batches,
)
from qubench.methods.losses import kl_to_reference, retain_nll_loss
from qubench.methods.runtime import Precision, Runtime
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
TrainingPrecision = Annotated[
    Precision, Field(description="fp32; bf16 compute with float32 master weights; auto = bf16 on CUDA, else fp32")
]
GradientCheckpointing = Annotated[bool, Field(description="recompute activations in backward to save memory")]


class TrainConfig(PluginConfig):
    """Hyper-parameters of the shared loop. The optimisation ones have no defaults here (see each method's
    config); the two runtime ones do, so that every method, third-party ones included, has them."""

    lr: LearningRate
    epochs: Epochs
    batch_size: BatchSize
    grad_accum: GradAccum
    max_len: MaxLen
    warmup_steps: WarmupSteps
    max_grad_norm: MaxGradNorm
    weight_decay: WeightDecay
    max_steps: MaxSteps
    # Part of the unlearned model's identity: bf16 compute gives different weights than fp32.
    precision: TrainingPrecision = "auto"
    gradient_checkpointing: GradientCheckpointing = False


Objective = Callable[[torch.nn.Module, torch.nn.Module | None, TokenBatch, TokenBatch | None], dict]


@dataclass
class TrainSession:
    """What the loop has built before the first step. Hooks read it; `model` they may replace
    (LoRA merges the adapters back before saving)."""

    ctx: UnlearnContext
    config: TrainConfig
    tokenizer: Any
    model: torch.nn.Module                # float32 master weights, train mode, the target's weights until step 1
    reference: torch.nn.Module | None     # frozen copy of the target, when the loss needs one
    forget: list[list[int]]               # the forget windows (token ids) the loop iterates over
    retain: list[list[int]] | None
    pad_id: int
    runtime: Runtime                      # device, rank, and how to share work with the other ranks


class TrainHook:
    """An extension of the shared loop; every method is a no-op here.

    The loop calls, in this order: `wrap_model` (on the freshly loaded model;
    also when the main process rebuilds the model's structure to receive
    sharded weights), `before_training` (the model, on the device but not yet
    wrapped for data parallelism or sharding, the reference and the windows
    exist; every rank calls it), `optimizer_ready` (once, on the prepared
    model), per micro-batch `extra_terms` and `micro_batch_done`, per optimizer
    step `gradients_ready`, `after_training` (on the main process only, with
    the whole trained model, before it is cast and saved), and records
    `summary()` in the outcome's `extra` under the hook's `name`.
    """

    name: ClassVar[str] = ""
    #: A modifier that makes its method a known-answer control (see UnlearnMethod.is_control).
    is_control: ClassVar[bool] = False

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train in place of `model` (e.g. with adapters); called before any weights move."""
        return model

    def before_training(self, session: TrainSession) -> None:
        pass

    def optimizer_ready(self, optimizer: torch.optim.Optimizer, session: TrainSession) -> None:
        pass

    def extra_terms(self, model: torch.nn.Module, forget: TokenBatch) -> dict[str, torch.Tensor]:
        """Terms to log for this forget micro-batch; the one under "loss", if any, is added to the loss.

        Under data parallelism `forget` is this rank's share: take means with `losses.divisor`."""
        return {}

    def micro_batch_done(self, values: dict[str, float]) -> None:
        """Every logged term of the micro-batch just done, averaged over ranks (the whole micro-batch's)."""

    def gradients_ready(self, session: TrainSession) -> None:
        """The step's gradients are complete (reduced across ranks), before clipping and the optimizer step."""

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


def check_batch_split(batch_size: int, ranks: int) -> None:
    """Every rank takes batch_size / ranks windows of each full micro-batch."""
    if batch_size % ranks:
        raise ConfigError(
            f"batch_size={batch_size} windows cannot be split evenly across {ranks} processes: choose a "
            f"batch_size divisible by {ranks} (it is the global micro-batch, so the result does not depend on "
            "the process count) or another number of processes"
        )


def saved_dtype(model_dir) -> torch.dtype:
    """The dtype the model folder was saved in (config `dtype`, formerly `torch_dtype`)."""
    config = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_model(model_dir, trainable: bool) -> torch.nn.Module:  # float32 on CPU; the runtime places it
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


def _check_finite_weights(runtime: Runtime, model: torch.nn.Module, steps: int) -> None:
    bad = runtime.nonfinite_parameters(model)
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
    """Optimise `objective` (plus any hook terms) over the forget set, save model + tokenizer to `ctx.out_dir`
    (from the main process; every process of a distributed run calls this and returns the same outcome)."""
    if ctx.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        # `--device cuda:N` on one process: Accelerate takes the current CUDA device (a launcher assigns
        # one per rank itself).
        torch.cuda.set_device(int(ctx.device.split(":", 1)[1]))
    runtime = Runtime(config.precision, ctx.parallelism)
    try:
        return _train(runtime, ctx, config, objective, needs_reference, needs_retain, label, hooks)
    finally:
        runtime.close()


def _train(runtime: Runtime, ctx: UnlearnContext, config: TrainConfig, objective: Objective,
           needs_reference: bool, needs_retain: bool, label: str, hooks: Sequence[TrainHook]) -> UnlearnOutcome:
    started = time.perf_counter()
    # The same seed on every rank while the model is built (LoRA initialises its adapters at random:
    # FSDP keeps each rank's own shard of them, so every rank must draw the same values).
    torch.manual_seed(ctx.seed)
    data_order = torch.Generator().manual_seed(ctx.seed)  # the same micro-batches on every rank
    check_batch_split(config.batch_size, runtime.ranks)

    if runtime.is_deepspeed and runtime.precision == "bf16" and saved_dtype(ctx.target_dir) == torch.float32:
        raise ConfigError(
            "DeepSpeed with bf16 keeps (and saves) bf16 copies of every weight, frozen ones included, so the "
            "unlearned model would differ from this float32 target everywhere: use --strategy fsdp (float32 "
            "master weights), or precision=fp32"
        )
    tokenizer = AutoTokenizer.from_pretrained(ctx.target_dir)
    model = _load_model(ctx.target_dir, trainable=True)
    reference = _load_model(ctx.target_dir, trainable=False) if needs_reference else None

    max_len = config.max_len or default_max_len(model.config)
    forget = chunk_documents(ctx.data.forget, tokenizer, max_len)
    retain = chunk_documents(ctx.data.retain, tokenizer, max_len) if needs_retain else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def structure() -> torch.nn.Module:
        built = _load_model(ctx.target_dir, trainable=True)
        for hook in hooks:
            built = hook.wrap_model(built)
        return built

    for hook in hooks:
        model = hook.wrap_model(model)
    if config.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA), several forwards per backward, DDP and FSDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    session = TrainSession(ctx, config, tokenizer, runtime.place(model), runtime.place_reference(reference),
                           forget, retain, pad_id, runtime)
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
    model, optimizer = runtime.prepare(model, optimizer, config.batch_size, config.max_grad_norm)
    reference = runtime.prepare_reference(session.reference)
    session.model, session.reference = model, reference
    for hook in hooks:
        hook.optimizer_ready(getattr(optimizer, "optimizer", optimizer), session)  # the torch optimizer itself
    clip_at = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    record = runtime.record(model, config.gradient_checkpointing)
    if runtime.rank > 0:  # dropout masks, if any: each rank its own stream (rank 0 continues the seed's)
        torch.manual_seed(ctx.seed + runtime.rank)

    log: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    step = 0
    batches = forget_retain_batches(forget, retain, config.batch_size, config.epochs, data_order, pad_id)
    with Steps(label, total_steps, ctx.progress and runtime.is_main) as progress:
        for index, (epoch, forget_batch, retain_batch) in enumerate(batches):
            # Accumulation groups never straddle epochs; the last group of an epoch may be short,
            # and each micro-batch is weighted by 1/(its group's size) so a step is always a mean.
            pos = index % micro_per_epoch
            group_size = min(config.grad_accum, micro_per_epoch - (pos - pos % config.grad_accum))
            last = pos % config.grad_accum == group_size - 1
            lr = _learning_rate(config, step)
            for group in optimizer.param_groups:  # before backward: DeepSpeed steps inside the last one
                group["lr"] = lr

            forget_share, weight = runtime.share(forget_batch)
            retain_share, _ = runtime.share(retain_batch)
            with runtime.micro_batch(model, last):
                terms = objective(model, reference, forget_share, retain_share)
                if hooks:
                    terms = _with_hook_terms(terms, hooks, model, forget_share)
                if weight != 1.0:  # a rank without rows of this micro-batch: in step, contributing nothing
                    terms = {k: v * weight for k, v in terms.items()}
                values = runtime.mean_over_ranks({k: float(v.detach()) for k, v in terms.items()})
                _check_finite(values, "loss", step + 1, epoch, lr)
                runtime.backward(terms["loss"] / group_size)
            for hook in hooks:
                hook.micro_batch_done(values)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / group_size

            if not last:
                continue
            for hook in hooks:
                hook.gradients_ready(session)
            grad_norm = runtime.clip_grad_norm(model, clip_at)
            _check_finite({"grad_norm": grad_norm}, "gradient", step + 1, epoch, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            entry = {"step": step, "epoch": epoch + 1, "lr": lr, **sums, "grad_norm": grad_norm}
            log.append(entry)
            sums = {}
            progress.advance(1, f"loss {entry['loss']:.4f}")
            if step >= total_steps:
                break

    _check_finite_weights(runtime, model, step)  # the last step's update is checked by no later loss
    session.model = runtime.trained_model(model, structure)
    failure = None
    if runtime.is_main:
        try:
            for hook in hooks:
                hook.after_training(session)
            _save(session.model, tokenizer, ctx)
        except BaseException as exc:  # the other ranks must not be left waiting for the main process
            failure = exc
    runtime.wait()
    if failure is not None:
        raise failure

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
            "training": record,
            **{hook.name: hook.summary() for hook in hooks},
        },
    )


def _save(model: torch.nn.Module, tokenizer, ctx: UnlearnContext) -> None:
    model.to(device="cpu", dtype=saved_dtype(ctx.target_dir))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)


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
