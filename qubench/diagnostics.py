"""Mechanism diagnostics: is the unlearning update small next to the quantization step,
and does quantization map the unlearned model back onto the quantized target?

arXiv 2410.16454 explains recovered knowledge by unlearning moving weights by
less than a quantization step, so that rounding sends most of them to the level
the target's weight rounds to. These numbers test that explanation on each run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from qubench.quantizers.base import DEFAULT_IGNORE, per_weight, quantizable_linears


@torch.no_grad()
def weight_deltas(target_model: torch.nn.Module, unlearned_model: torch.nn.Module,
                  quantized_modules: Iterable[str] | None = None) -> dict[str, Any]:
    """Mean and max |w_unlearned - w_target|: over the weights of `quantized_modules` (the modules the
    run's quantizer rounds, `Quantizer.quantized_modules`; default: every Linear but lm_head), and over
    every parameter (`overall_*`)."""
    if quantized_modules is None:
        quantized_modules = quantizable_linears(target_model, DEFAULT_IGNORE)
    unlearned = dict(unlearned_model.named_parameters())
    quantized = {f"{name}.weight" for name in quantized_modules}
    sums = {"quantized": 0.0, "overall": 0.0}
    maxima = {"quantized": 0.0, "overall": 0.0}
    counts = {"quantized": 0, "overall": 0}
    for name, w_target in target_model.named_parameters():
        if name not in unlearned or unlearned[name].shape != w_target.shape:
            raise ValueError(f"target and unlearned models differ at parameter {name!r}: "
                             "they must share one architecture")
        delta = (unlearned[name].detach().double() - w_target.detach().double()).abs()
        for scope in ("quantized", "overall") if name in quantized else ("overall",):
            sums[scope] += delta.sum().item()
            maxima[scope] = max(maxima[scope], delta.max().item())
            counts[scope] += delta.numel()
    mean = lambda scope: sums[scope] / counts[scope] if counts[scope] else 0.0
    return {
        "mean_abs_delta": mean("quantized"),
        "max_abs_delta": maxima["quantized"],
        "overall_mean_abs_delta": mean("overall"),
        "overall_max_abs_delta": maxima["overall"],
        "quantized_weight_count": counts["quantized"],
        "overall_weight_count": counts["overall"],
    }


@torch.no_grad()
def mean_step(quantizer, target_model: torch.nn.Module) -> float:
    """The quantization step averaged over every weight the quantizer rounds in the target
    (each weight counted once, so wide layers weigh more). 0 for a full-precision control."""
    total, count = 0.0, 0
    for module in quantizer.quantized_modules(target_model).values():
        weight = module.weight.detach()
        # Every scale covers the same number of weights within a layer, so the mean of
        # the scales is the mean step over that layer's weights.
        total += quantizer.step_size(weight).double().mean().item() * weight.numel()
        count += weight.numel()
    return total / count if count else 0.0


@torch.no_grad()
def quantized_disagreement(q_target_weights: dict[str, torch.Tensor],
                           q_unlearned_weights: dict[str, torch.Tensor]) -> float:
    """The share of quantized weights that differ between the quantized target and the
    quantized unlearned model. Near 0 means quantization maps the unlearned model back
    onto the target.

    When both sides carry their steps (`QuantizedWeights.steps`), a weight differs if its
    grid level (weight / step, an integer) differs: the two models' scales differ slightly
    wherever the update moved a group's largest weight, which shifts the value of every
    weight in that group without moving any of them to another level. Without steps
    (full precision) the values themselves are compared.
    """
    if set(q_target_weights) != set(q_unlearned_weights):
        missing = sorted(set(q_target_weights) ^ set(q_unlearned_weights))
        raise ValueError(f"quantized target and unlearned checkpoints cover different modules: {missing[:5]}")
    if not q_target_weights:
        raise ValueError("no quantized weights to compare")
    target_steps = getattr(q_target_weights, "steps", {})
    unlearned_steps = getattr(q_unlearned_weights, "steps", {})
    differ, count = 0, 0
    for name, w_target in q_target_weights.items():
        w_unlearned = q_unlearned_weights[name]
        if name in target_steps and name in unlearned_steps:
            w_target = _grid_level(w_target, target_steps[name])
            w_unlearned = _grid_level(w_unlearned, unlearned_steps[name])
        differ += (w_target != w_unlearned).sum().item()
        count += w_target.numel()
    return differ / count


def _grid_level(weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    # A dequantized weight is (integer level) x step, up to float rounding far below 0.5.
    return torch.round(weight.double() / per_weight(step, weight.shape).double())


__all__ = ["mean_step", "quantized_disagreement", "weight_deltas"]
