"""The score stage: pre/post/gap/recovery per metric, and the mechanism diagnostics."""

from __future__ import annotations

from pathlib import Path

from qubench.evaluation.measure import Measured
from qubench import metric_catalog
from qubench.results import Diagnostics, MetricRow, catalogued_row


def score(measured: Measured) -> dict[str, MetricRow]:
    """One row per measured metric, in the catalogue's display order."""
    m = measured.by_model
    measured_names = {name for row in m.values() for name in row}
    unknown = measured_names - set(metric_catalog.BY_NAME)
    if unknown:  # a metric without a catalogue entry would have no range, direction or noise floor
        raise ValueError(f"measured metrics missing from qubench.metric_catalog: {sorted(unknown)}")
    get = lambda label, name: m.get(label, {}).get(name)
    return {
        name: catalogued_row(name, get("pre", name), get("post", name), get("target_pre", name),
                             get("target_post", name), get("retrain", name), get("retrain_post", name))
        for name in metric_catalog.names() if name in measured_names
    }


def diagnostics_for(quant, target_dir: Path, unlearned_dir: Path, q_target: Path, q_unlearned: Path) -> Diagnostics:
    """How large the unlearning update is next to the quantization step, and whether
    quantization maps the unlearned model back onto the quantized target."""
    from transformers import AutoModelForCausalLM

    from qubench import diagnostics

    target = AutoModelForCausalLM.from_pretrained(target_dir)
    unlearned = AutoModelForCausalLM.from_pretrained(unlearned_dir)
    # The same weights the quantizer rounds (its `ignore` list included), so the update and the step
    # describe one weight set.
    deltas = diagnostics.weight_deltas(target, unlearned, quant.quantized_modules(target))
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
