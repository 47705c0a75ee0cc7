"""The score stage: pre/post/gap/recovery per metric, whether the run can show forgetting at all
(`separation`), and the mechanism diagnostics."""

from __future__ import annotations

from pathlib import Path

from qubench.evaluation.measure import Measured
from qubench import metric_catalog
from qubench.results import Diagnostics, MetricRow, MetricSeparation, Separation, catalogued_row

#: The least margin by which the target must remember a forget metric more than a model that never saw
#: the forget set, per view, in the metric's own points (all are x100 scales). Generation (VerbMem,
#: KnowMem: ROUGE-L F1 x100): models that never saw a probe set score within ~1.6 points of each other on
#: it (reference grid, VerbMem on holdout text: target 25.2, retrain 25.3, the target quantized at 3-8
#: bits 24.3-25.9), so 5 points is well outside that. Classification (label accuracy x100): one post of 30
#: is 3.3 points, so 5 points is two posts. Membership (PrivLeak) is not checked: it is already a
#: comparison with the retrain model.
SEPARATION_THRESHOLD: dict[metric_catalog.View, float] = {"generation": 5.0, "classification": 5.0}


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


def separation(measured: Measured) -> Separation:
    """Whether the target remembers the forget set measurably more than a model that never saw it, per
    forget metric of the views in SEPARATION_THRESHOLD (roles and directions from the metric catalogue).

    The reference is the retrain model when one was measured, else the target's own score on the
    metric's floor (the same kind of probe on never-trained data: VerbMem on holdout text, accuracy on
    never-trained posts). A run none of whose metrics separates cannot show forgetting or recovery: its
    unlearned model has nothing to forget that the retrain model does not also "know".

    `measured.by_model` needs "target_pre" (the target at full precision) and, if measured, "retrain";
    other models are not read (so `qubench audit` can call it on a target/retrain pair alone)."""
    target = measured.by_model.get("target_pre") or {}
    retrain = measured.by_model.get("retrain") or {}
    checks = []
    for metric in metric_catalog.METRICS:
        if (metric.role != "forget" or metric.view not in SEPARATION_THRESHOLD or metric.memorised == 0
                or target.get(metric.name) is None):
            continue
        ref, kind, ref_metric = None, None, None
        if retrain.get(metric.name) is not None:
            ref, kind, ref_metric = retrain[metric.name], "retrain", metric.name
        elif metric.floor is not None and target.get(metric.floor) is not None:
            ref, kind, ref_metric = target[metric.floor], "floor", metric.floor
        threshold = SEPARATION_THRESHOLD[metric.view]
        margin = None if ref is None else (target[metric.name] - ref) * metric.memorised
        checks.append(MetricSeparation(metric=metric.name, view=metric.view, target=target[metric.name],
                                       reference=ref, reference_kind=kind, reference_metric=ref_metric,
                                       margin=margin, threshold=threshold,
                                       separated=None if margin is None else margin >= threshold))
    return _verdict(checks)


def _verdict(checks: list[MetricSeparation]) -> Separation:
    checked = [c for c in checks if c.separated is not None]
    apart = [c for c in checked if c.separated]
    close = [c for c in checked if not c.separated]
    if not checked:
        return Separation(status="unchecked", metrics=checks, message=(
            "separation unchecked: no retrain model and no never-trained floor to compare the target with, so "
            "nothing shows that the target remembers the forget set at all"))
    if not apart:
        return Separation(status="not separated", metrics=checks, message=(
            f"the target does not remember the forget set measurably more than {_evidence(close)}: this run "
            "cannot show forgetting or recovery"))
    if close:
        names = " and ".join(c.metric for c in close)
        return Separation(status="partly separated", metrics=checks, message=(
            f"on {names} the target does not remember the forget set measurably more than {_evidence(close)}, "
            f"so the gap and recovery of {names} carry no information; "
            f"{' and '.join(c.metric for c in apart)} separate{'s' if len(apart) == 1 else ''}"))
    return Separation(status="separated", metrics=checks, message=(
        f"the target remembers the forget set measurably more than {_evidence(apart)}"))


def _evidence(checks: list[MetricSeparation]) -> str:
    """'the retrain model (verbmem_f 1.4 vs 0.9, knowmem_f 0.0 vs 0.0; at least 5 points needed)', or
    'its own score on never-trained probes (verbmem_f 76.6 vs verbmem_holdout 24.0; ...)'."""
    refs = " or ".join(dict.fromkeys("the retrain model" if c.reference_kind == "retrain"
                                     else "its own score on never-trained probes" for c in checks))
    values = ", ".join(f"{c.metric} {c.target:.1f} vs "
                       f"{'' if c.reference_kind == 'retrain' else c.reference_metric + ' '}{c.reference:.1f}"
                       for c in checks)
    needed = " / ".join(dict.fromkeys(f"{c.threshold:g}" for c in checks))
    return f"{refs} ({values}; at least {needed} points needed)"


def separation_from_rows(rows: dict[str, MetricRow]) -> Separation:
    """`separation` of a stored result, from its rows' target and retrain values (the numbers the
    pipeline derived it from): for result files written before the check existed, and to check a
    stored separation against its numbers."""
    by_model = {"target_pre": {n: r.target_pre for n, r in rows.items()}}
    if any(r.retrain is not None for r in rows.values()):
        by_model["retrain"] = {n: r.retrain for n, r in rows.items()}
    return separation(Measured(by_model, auc_reference={}))


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
