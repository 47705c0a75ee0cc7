"""The score stage: pre/post/gap/recovery per metric, and the mechanism diagnostics."""

from __future__ import annotations

from pathlib import Path

from qubench.evaluation.stage import Measured
from qubench.results import (DEFAULT_MIN_FORGETTING, METRIC_HELP, MIN_FORGETTING, Diagnostics, MetricRow,
                             metric_row)


def score(measured: Measured) -> dict[str, MetricRow]:
    m = measured.by_model
    names = [k for k in METRIC_HELP if any(k in row for row in m.values())]
    get = lambda label, name: m.get(label, {}).get(name)
    return {
        name: metric_row(get("pre", name), get("post", name), get("target_pre", name), get("target_post", name),
                         get("retrain", name), MIN_FORGETTING.get(name, DEFAULT_MIN_FORGETTING))
        for name in names
    }


def diagnostics_for(quant, target_dir: Path, unlearned_dir: Path, q_target: Path, q_unlearned: Path) -> Diagnostics:
    """How large the unlearning update is next to the quantization step, and whether
    quantization maps the unlearned model back onto the quantized target."""
    from transformers import AutoModelForCausalLM

    from qubench import diagnostics

    target = AutoModelForCausalLM.from_pretrained(target_dir)
    unlearned = AutoModelForCausalLM.from_pretrained(unlearned_dir)
    deltas = diagnostics.weight_deltas(target, unlearned)
    step = diagnostics.mean_step(quant, target)
    disagreement = diagnostics.quantized_disagreement(quant.dequantized_weights(q_target),
                                                      quant.dequantized_weights(q_unlearned))
    mean_delta = deltas["mean_abs_delta"]
    return Diagnostics(
        mean_abs_delta=mean_delta,
        max_abs_delta=deltas["max_abs_delta"],
        mean_quant_step=step,
        delta_over_step=(mean_delta / step) if step else None,
        quantized_disagreement=disagreement,
        extra={k: v for k, v in deltas.items() if k not in ("mean_abs_delta", "max_abs_delta")},
    )
