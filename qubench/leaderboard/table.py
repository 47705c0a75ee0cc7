"""Rows as a flat table: one column per shown value, each with a label and a one-sentence help."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from qubench.leaderboard.rows import MetricStats, Row


@dataclass(frozen=True)
class Column:
    id: str
    label: str
    kind: str     # text | number | int | percent | date
    help: str


COLUMNS = [
    Column("rank", "rank", "int", "Position within the setting by the ranking rule above; empty for baselines and unranked rows."),
    Column("standing", "standing", "text", "Baseline, ranked, or why the row is not ranked."),
    Column("method", "method", "text", "The unlearning method's registered name (BASE+MOD for compositions)."),
    Column("composition", "composition", "text", "Base loss and modifiers of a composed method; empty for plain methods."),
    Column("plugin", "plugin", "text", "The Python package that provides the method, with its version."),
    Column("quantizer", "quantizer", "text", "The quantizer plugin, with the parameters the grid gave it."),
    Column("family", "family", "text", "Quantization algorithm family (rtn, gptq, awq, bitsandbytes, none)."),
    Column("bits", "bits", "int", "Bits per quantized weight."),
    Column("group_size", "group size", "int", "Weights sharing one scale (block size for bitsandbytes)."),
    Column("library", "library", "text", "The library that quantized the checkpoint, with its version."),
    Column("task", "task", "text", "The benchmark task (forget/retain data and probes), with its parameters."),
    Column("model", "model", "text", "The target model unlearning starts from."),
    Column("engine", "engine", "text", "The evaluation engine and its library versions."),
    Column("evaluation", "evaluation", "text", "Evaluation settings: dtype, batch size, and a probe limit if one was set."),
    Column("seeds", "seeds", "text", "Seeds averaged in this row."),
    Column("forget_metric", "forget metric", "text", "The metric that measures what is left of the forget set."),
    Column("forget_pre", "forget pre", "number", "Forget metric of the unlearned model at full precision (lower = more forgotten)."),
    Column("forget_post", "forget post", "number", "Forget metric of the unlearned model after quantization: what the ranking uses."),
    Column("forget_gap", "gap", "number", "post - pre: how much forgotten knowledge quantization brought back."),
    Column("recovery", "recovery", "percent", "(post - pre) / (target - pre): the share of the forgetting undone by quantization."),
    Column("recovery_ci", "recovery 95% CI", "text", "Bootstrap interval of recovery over seeds; none with a single seed."),
    Column("forget2_metric", "2nd forget metric", "text", "A second forget metric (KnowMem on the forget set for MUSE-style tasks)."),
    Column("forget2_pre", "2nd pre", "number", "Second forget metric at full precision."),
    Column("forget2_post", "2nd post", "number", "Second forget metric after quantization."),
    Column("forget2_gap", "2nd gap", "number", "post - pre of the second forget metric."),
    Column("utility_metric", "utility metric", "text", "The metric of what the model must keep (retain knowledge or test accuracy)."),
    Column("utility_pre", "utility pre", "number", "Utility of the unlearned model at full precision (higher = better)."),
    Column("utility_post", "utility post", "number", "Utility of the unlearned model after quantization."),
    Column("utility_target_post", "target utility (q)", "number", "Utility of the target quantized the same way: the ranking's reference."),
    Column("badge", "verified", "text", "reference: the project's own run; verified: every cell of the row re-run by `qubench verify` (maintainers) and matched; submitted: not (all) re-run, with how many are; not verified: a local results folder."),
    Column("source", "source", "text", "Where the row comes from: the reference grid, a submission or a results folder."),
    Column("date", "date", "date", "When the newest of the row's runs finished."),
]
HIDDEN = ("key", "runs", "recovery_low", "recovery_high", "verified_flag")  # for plots, filters, details


def _mean(stats: MetricStats | None, field: str) -> float | None:
    return stats.mean(field) if stats is not None else None


def _ci(stats: MetricStats | None) -> str:
    if stats is None or stats.values["recovery"].n == 0:
        return "undefined"
    s = stats.values["recovery"]
    if s.low is None:
        return f"none (n={s.n})"
    return f"[{s.low:.0%}, {s.high:.0%}] (n={s.n})"


def to_frame(rows: list[Row]) -> pd.DataFrame:
    records = []
    for r in rows:
        records.append({
            "rank": r.rank, "standing": r.standing, "method": r.method, "composition": r.composition,
            "plugin": r.plugin, "quantizer": r.quantizer, "family": r.quant_family, "bits": r.bits,
            "group_size": r.group_size, "library": r.quant_library, "task": r.task, "model": r.model,
            "engine": r.engine, "evaluation": r.evaluation, "seeds": ", ".join(map(str, r.seeds)),
            "forget_metric": r.forget.name if r.forget else None,
            "forget_pre": _mean(r.forget, "pre"), "forget_post": _mean(r.forget, "post"),
            "forget_gap": _mean(r.forget, "gap"), "recovery": _mean(r.forget, "recovery"),
            "recovery_ci": _ci(r.forget),
            "forget2_metric": r.forget2.name if r.forget2 else None,
            "forget2_pre": _mean(r.forget2, "pre"), "forget2_post": _mean(r.forget2, "post"),
            "forget2_gap": _mean(r.forget2, "gap"),
            "utility_metric": r.utility.name if r.utility else None,
            "utility_pre": _mean(r.utility, "pre"), "utility_post": _mean(r.utility, "post"),
            "utility_target_post": _mean(r.utility, "target_post"),
            "badge": r.badge, "source": r.source, "date": r.date, "key": r.key, "runs": list(r.runs),
            "recovery_low": r.forget.values["recovery"].low if r.forget else None,
            "recovery_high": r.forget.values["recovery"].high if r.forget else None,
            "verified_flag": r.verified,
        })
    columns = [c.id for c in COLUMNS] + list(HIDDEN)
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.astype({"rank": "Int64", "group_size": "Int64"})


#: Cells a spreadsheet would run as a formula (CSV injection); such text is prefixed with a quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def to_csv(frame: pd.DataFrame) -> bytes:
    shown = frame[[c.id for c in COLUMNS]].copy()
    for col in shown.columns:
        if not pd.api.types.is_numeric_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v)
    shown.columns = [c.label for c in COLUMNS]
    return shown.to_csv(index=False).encode("utf-8")
