"""SURE (arXiv 2410.16454, section 6): train only the weights the forget loss singles out.

Saliency is measured once, at the starting weights: the gradient of the base
method's forget term (GA's -CE, NPO's loss), averaged over every forget
window, is taken with respect to every Linear weight matrix.

- module level (default, as in the paper): a Linear module is salient when the
  Frobenius norm of its weight gradient is at or above the `sure_percentile`-th
  percentile (numpy's linear interpolation) of those norms over all Linear
  modules. Salient modules train (weight and bias); every other parameter,
  embeddings and norms included, is frozen (requires_grad False).
- row level (`sure_granularity="row"`): the same rule over the L2 norms of
  every output row (neuron) of every Linear weight, pooled across modules.
  Modules with no salient row are frozen; in the others the non-salient rows'
  gradients (and their bias entries) are zeroed once each step's gradients
  are complete (`gradients_ready`), before clipping: the same gradients a
  per-micro-batch autograd hook would leave, but also right on FSDP2's
  sharded gradients, where each rank zeroes the rows of its own shard.

Under data parallelism the main process measures saliency (on the whole,
not yet sharded model) and sends its choice to every rank, so all ranks
freeze exactly the same weights.

The percentile is the paper's threshold gamma expressed as a share (90 =
the top 10% train), as in the authors' code. With raw norms large matrices
tend to rank higher; that is the paper's rule and it is kept.

The row mask must also survive AdamW: with zero gradients from the first
step its moments stay exactly zero and the Adam update is exactly zero, but
decoupled weight decay would still shrink the frozen rows. Row-masked weights
are therefore moved to a parameter group without weight decay, and a
pre-step hook applies the same decay, p *= 1 - lr * wd, to their salient rows
only, exactly as AdamW would (decay first, then the Adam update); on a sharded
parameter, to the salient rows of this rank's shard.

Deliberate differences from the authors' public code: there the mask is
built inside `optimizer_step`, which HF Trainer never calls, so it is never
applied; and the forget loss is back-propagated twice per step (once for the
saliency, once in the loss). Here the mask is computed once, applied, and
verified by tests (frozen weights stay bit-identical).

The paper pairs the mask with a larger learning rate (1e-4 instead of 1e-5):
only salient modules train, so this is the default `lr` of any `+sure`
composition.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from qubench.errors import ConfigError
from qubench.methods.data import collate
from qubench.methods.runtime import local, local_rows
from qubench.methods.train_loop import TrainHook, TrainSession
from qubench.plugin import PluginConfig


class SaliencyConfig(PluginConfig):
    sure_percentile: Annotated[
        float,
        Field(gt=0, lt=100, description="modules (rows) whose forget-gradient norm reaches this percentile train"),
    ] = 90.0
    sure_granularity: Annotated[
        Literal["module", "row"], Field(description="mask whole Linear modules (paper) or single output rows")
    ] = "module"


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def forget_gradients(session: TrainSession, forget_loss) -> dict[str, torch.Tensor]:
    """Gradient of the mean forget term over all forget windows, per Linear module's weight."""
    model, windows, size = session.model, session.forget, session.config.batch_size
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    n_batches = -(-len(windows) // size)
    for start in range(0, len(windows), size):
        batch = collate(windows[start : start + size], session.pad_id).to(device)
        (forget_loss(model, session.reference, batch) / n_batches).backward()
    grads = {name: m.weight.grad.detach().clone() for name, m in linear_modules(model).items()
             if m.weight.grad is not None}
    # The first optimizer step must see only its own gradients.
    model.zero_grad(set_to_none=True)
    return grads


def salient_modules(norms: dict[str, float], percentile: float) -> tuple[set[str], float]:
    threshold = float(np.percentile(np.array(list(norms.values()), dtype=np.float64), percentile))
    return {name for name, norm in norms.items() if norm >= threshold}, threshold


def salient_rows(row_norms: dict[str, torch.Tensor], percentile: float) -> tuple[dict[str, torch.Tensor], float]:
    pooled = torch.cat([n.double().cpu() for n in row_norms.values()]).numpy()
    threshold = float(np.percentile(pooled, percentile))
    return {name: (norms.double() >= threshold).cpu() for name, norms in row_norms.items()}, threshold


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def zero_other_rows(row_masks: dict[torch.Tensor, torch.Tensor]) -> None:
    """Zero the gradient rows outside each parameter's mask (masks as `local_rows` gives them)."""
    with torch.no_grad():
        for param, mask in row_masks.items():
            if param.grad is not None:
                grad = local(param.grad)
                # masked_fill, not multiply: 0 * nan would pass a non-finite gradient into frozen rows
                grad.masked_fill_(~_per_row(mask, grad), 0.0)


def exclude_rows_from_decay(optimizer: torch.optim.Optimizer, row_masks: dict, weight_decay: float) -> None:
    """Make AdamW's decoupled weight decay act on the salient rows of `row_masks`' parameters only.

    The masked parameters move to their own group without decay; a pre-step hook
    applies p *= 1 - lr * wd to their salient rows, which is what AdamW does
    before its Adam update. (With weight decay 0 nothing is needed: rows whose
    gradient is zero from the start keep zero moments and get a zero update.)
    A sharded parameter's mask covers this rank's rows (`local_rows`).
    """
    masked = {id(p) for p in row_masks}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in masked]
    optimizer.add_param_group({"params": list(row_masks), "weight_decay": 0.0})
    group = optimizer.param_groups[-1]

    def decay_salient_rows(opt, args, kwargs) -> None:
        factor = 1.0 - group["lr"] * weight_decay
        with torch.no_grad():
            for param, mask in row_masks.items():
                rows = local(param)
                scale = torch.where(mask, factor, 1.0).to(rows.dtype)  # frozen rows: x * 1.0 == x exactly
                rows.mul_(_per_row(scale, rows))

    optimizer.register_step_pre_hook(decay_salient_rows)


class SaliencyMask(TrainHook):
    """Modifier `sure`: freeze everything but the forget-salient Linear modules (or rows)."""

    name: ClassVar[str] = "sure"
    Config: ClassVar[type[PluginConfig]] = SaliencyConfig
    base_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4}  # the paper's larger rate on salient weights
    description: ClassVar[str] = "SURE saliency mask: only forget-salient Linear modules train (arXiv 2410.16454)"

    def __init__(self, method):
        self.forget_loss = method.forget_loss
        self.percentile = method.config.sure_percentile
        self.granularity = method.config.sure_granularity
        self.weight_decay = method.config.weight_decay
        self.row_masks: dict[str, torch.Tensor] = {}             # parameter name -> row mask
        self.live_masks: dict[torch.Tensor, torch.Tensor] = {}   # the prepared model's parameter -> its rows' mask
        self.stats: dict[str, Any] = {}

    def _choose(self, session: TrainSession):
        grads = forget_gradients(session, self.forget_loss)
        if self.granularity == "module":
            return salient_modules({n: float(g.norm()) for n, g in grads.items()}, self.percentile)
        return salient_rows({n: g.norm(dim=1) for n, g in grads.items()}, self.percentile)

    def before_training(self, session: TrainSession) -> None:
        if self.granularity == "row" and session.runtime.is_deepspeed:
            raise ConfigError("sure_granularity='row' masks gradient rows, which DeepSpeed ZeRO-3 keeps in flat "
                              "partitions: use --strategy fsdp (or ddp), or sure_granularity='module'")
        chosen, threshold = session.runtime.from_main(lambda: self._choose(session))
        modules = linear_modules(session.model)
        session.model.requires_grad_(False)
        if self.granularity == "module":
            for name in chosen:
                modules[name].requires_grad_(True)
            self.stats = {"salient_modules": sorted(chosen)}
        else:
            masks = chosen
            for name, mask in masks.items():
                if not mask.any():
                    continue
                for kind, param in modules[name].named_parameters(recurse=False):  # weight, and bias if any
                    param.requires_grad_(True)
                    self.row_masks[f"{name}.{kind}"] = mask
            self.stats = {
                "salient_rows": int(sum(int(m.sum()) for m in masks.values())),
                "total_rows": int(sum(m.numel() for m in masks.values())),
                "modules_touched": sorted(n for n, m in masks.items() if m.any()),
            }
        trainable = sum(p.numel() for p in session.model.parameters() if p.requires_grad)
        self.stats.update({
            "granularity": self.granularity,
            "percentile": self.percentile,
            "threshold": threshold,
            "linear_modules": len(modules),
            "trainable_parameters": trainable,  # rows masked by hooks still count here
            "total_parameters": sum(p.numel() for p in session.model.parameters()),
        })

    def optimizer_ready(self, optimizer: torch.optim.Optimizer, session: TrainSession) -> None:
        # The prepared model's parameters (FSDP2 replaced them by sharded DTensors), found by name.
        params = dict(session.runtime.unwrap(session.model).named_parameters())
        self.live_masks = {params[name]: local_rows(mask, params[name]) for name, mask in self.row_masks.items()}
        if self.live_masks and self.weight_decay > 0:
            exclude_rows_from_decay(optimizer, self.live_masks, self.weight_decay)

    def gradients_ready(self, session: TrainSession) -> None:
        zero_other_rows(self.live_masks)

    def summary(self) -> dict[str, Any]:
        return self.stats
