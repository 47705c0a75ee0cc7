"""The score stage: pre/post/gap/recovery per metric, the mechanism diagnostics, and the separation
check that says whether recovery figures mean anything at all."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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


#: The separation check's threshold, in points of the task's forget metric (ROUGE-L F1 x100 or label
#: accuracy x100): the target must score at least this much above its reference. Below it the target
#: does not measurably remember the forget set, so "the share of the forgetting that quantization
#: undoes" refers to no forgetting. 5 points: the muse-news-mini recipe that barely separated
#: (VerbMem_f 14.4 vs 12.8, README) fails it; the shipped recipes (76.6 vs 24.8, 50.0 vs 10.4) and
#: MUSE's own 7B pairs pass it by far.
SEPARATION_THRESHOLD = 5.0


@dataclass(frozen=True)
class Separation:
    """Does the target remember the forget set measurably more than its reference: the retrain model,
    or without one, the target itself on never-trained text of the same kind (the floor metric)?"""

    metric: str | None          # the task's forget metric (the first of metric_catalog.HEADLINES measured)
    target: float | None        # the target's value at full precision
    reference: float | None
    reference_label: str        # what `reference` is, in words
    threshold: float = SEPARATION_THRESHOLD

    @property
    def margin(self) -> float | None:
        return None if self.target is None or self.reference is None else self.target - self.reference

    @property
    def separated(self) -> bool:
        return self.margin is not None and self.margin >= self.threshold

    def sentence(self) -> str:
        if self.margin is None:
            return f"not measurable ({self.reference_label}), so recovery figures carry no information."
        cmp, verdict = (">=", "it remembers the forget set, so recovery figures are informative") if self.separated \
            else ("<", "it does not remember the forget set measurably more, so recovery figures carry no information")
        return (f"the target scores {self.target:.1f} on {self.metric} against {self.reference:.1f} for "
                f"{self.reference_label} (margin {self.margin:.1f} {cmp} {self.threshold:g} points): {verdict}.")

    def as_dict(self) -> dict:
        return {**asdict(self), "margin": self.margin, "separated": self.separated, "sentence": self.sentence()}


def separation(measured: Measured, threshold: float = SEPARATION_THRESHOLD) -> Separation:
    """The separation check on full-precision measurements (`target_pre`, and `retrain` when measured)."""
    target = measured.by_model.get("target_pre", {})
    retrain = measured.by_model.get("retrain")
    headline = next((h for h in metric_catalog.HEADLINES if target.get(h.forget) is not None), None)
    if headline is None:
        return Separation(None, None, None, "the target has no forget metric measured", threshold)
    name = headline.forget
    if retrain is not None and retrain.get(name) is not None:
        return Separation(name, target[name], retrain[name], "the retrain model", threshold)
    view = metric_catalog.get(name).view
    floor = next((m.name for m in metric_catalog.METRICS if m.role == "floor" and m.view == view), None)
    if floor is None or target.get(floor) is None:
        return Separation(name, target[name], None, "no retrain model and no holdout metric measured", threshold)
    return Separation(name, target[name], target[floor], f"the target on never-trained holdout text, {floor}",
                      threshold)
