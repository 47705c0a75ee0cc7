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
    Column("rank", "rank", "text", "Position within the setting by the ranking rule above; empty for baselines and unranked rows."),
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
    Column("separation", "separation", "text", "Whether the target remembers the forget metric measurably more than the retrain model (or never-trained text): a row that does not cannot show forgetting or recovery and is not ranked."),
    Column("forget_metric", "forget metric", "text", "The metric that measures what is left of the forget set."),
    Column("forget_pre", "forget pre", "number", "Forget metric of the unlearned model at full precision (lower = more forgotten)."),
    Column("forget_post", "forget post", "number", "Forget metric of the unlearned model after quantization: what the ranking uses."),
    Column("forget_gap", "gap", "number", "post - pre: how much forgotten knowledge quantization brought back."),
    Column("controlled", "recovered (controlled)", "percent",
           "Damage-controlled recovery: the share of the forgetting quantization takes back, measured between the "
           "retrain model (0) and the target (1) quantized the same way: 0% = survives, 100% = fully undone."),
    Column("controlled_ci", "controlled 95% CI", "text",
           "Hierarchical bootstrap over seeds and probes (paired across models)."),
    Column("verdict", "verdict", "text",
           "From the controlled interval: recovers (all of it at or above 10%), does not recover (all of it below "
           "10%), undetermined."),
    Column("position_post", "position post", "number",
           "Where the quantized unlearned model sits between the quantized retrain model (0) and quantized target (1)."),
    Column("recovery", "recovery (paper)", "percent",
           "(post - pre) / (target - pre), against the full-precision target as the papers report it: it also "
           "counts the quantizer's damage to the target."),
    Column("recovery_ci", "paper 95% CI", "text", "Interval of the paper's figure, same bootstrap."),
    Column("forget2_metric", "2nd forget metric", "text", "A second forget metric (KnowMem on the forget set for MUSE-style tasks)."),
    Column("forget2_pre", "2nd pre", "number", "Second forget metric at full precision."),
    Column("forget2_post", "2nd post", "number", "Second forget metric after quantization."),
    Column("forget2_gap", "2nd gap", "number", "post - pre of the second forget metric."),
    Column("utility_metric", "utility metric", "text", "The metric of what the model must keep (retain knowledge or test accuracy)."),
    Column("utility_pre", "utility pre", "number", "Utility of the unlearned model at full precision (higher = better)."),
    Column("utility_post", "utility post", "number", "Utility of the unlearned model after quantization."),
    Column("utility_change", "utility change", "number", "post - pre: the unlearned model's utility change under quantization (a utility metric has no recovery)."),
    Column("utility_target_post", "target utility (q)", "number", "Utility of the target quantized the same way: the ranking's reference."),
    Column("utility_target_change", "target utility change", "number", "The target's own utility change under quantization."),
    Column("badge", "verified", "text", "reference: the project's own run; verified: every cell of the row re-run by `qubench verify` (maintainers) and matched; submitted: not (all) re-run, with how many are; not verified: a local results folder."),
    Column("source", "source", "text", "Where the row comes from: the reference grid, a submission or a results folder."),
    Column("date", "date", "date", "When the newest of the row's runs finished."),
]
HIDDEN = ("key", "runs", "recovery_low", "recovery_high", "controlled_low", "controlled_high", "verified_flag",
          "control", "audited_flag")  # for plots, filters, details


def _mean(stats: MetricStats | None, field: str) -> float | None:
    return stats.mean(field) if stats is not None else None


def _rank_cell(rank: int | None) -> str:
    """A rank as the page shows it: text, so that baselines and unranked rows get an empty cell (a
    missing number would be drawn as the word "None"); rows are already in rank order."""
    return "" if rank is None else str(rank)


def _ci(stats: MetricStats | None, field: str = "recovery") -> str:
    if stats is None or stats.values[field].n == 0:
        return "undefined"
    s = stats.values[field]
    if s.low is None:
        return f"none (n={s.n})"
    return f"[{s.low:.0%}, {s.high:.0%}] (n={s.n})"


def _bound(stats: MetricStats | None, field: str, end: str) -> float | None:
    return getattr(stats.values[field], end) if stats is not None else None


def to_frame(rows: list[Row]) -> pd.DataFrame:
    records = []
    for r in rows:
        records.append({
            "rank": _rank_cell(r.rank), "standing": r.standing, "method": r.method, "composition": r.composition,
            "plugin": r.plugin, "quantizer": r.quantizer, "family": r.quant_family, "bits": r.bits,
            "group_size": r.group_size, "library": r.quant_library, "task": r.task, "model": r.model,
            "engine": r.engine, "evaluation": r.evaluation, "seeds": ", ".join(map(str, r.seeds)),
            "separation": r.separation, "forget_metric": r.forget.name if r.forget else None,
            "forget_pre": _mean(r.forget, "pre"), "forget_post": _mean(r.forget, "post"),
            "forget_gap": _mean(r.forget, "gap"),
            "controlled": _mean(r.forget, "controlled_recovery"),
            "controlled_ci": _ci(r.forget, "controlled_recovery"),
            "verdict": r.forget.verdict if r.forget else None,
            "position_post": _mean(r.forget, "position_post"),
            "recovery": _mean(r.forget, "recovery"), "recovery_ci": _ci(r.forget),
            "forget2_metric": r.forget2.name if r.forget2 else None,
            "forget2_pre": _mean(r.forget2, "pre"), "forget2_post": _mean(r.forget2, "post"),
            "forget2_gap": _mean(r.forget2, "gap"),
            "utility_metric": r.utility.name if r.utility else None,
            "utility_pre": _mean(r.utility, "pre"), "utility_post": _mean(r.utility, "post"),
            "utility_change": _mean(r.utility, "gap"), "utility_target_post": _mean(r.utility, "target_post"),
            "utility_target_change": _mean(r.utility, "target_change"),
            "badge": r.badge, "source": r.source, "date": r.date, "key": r.key, "runs": list(r.runs),
            "recovery_low": _bound(r.forget, "recovery", "low"),
            "recovery_high": _bound(r.forget, "recovery", "high"),
            "controlled_low": _bound(r.forget, "controlled_recovery", "low"),
            "controlled_high": _bound(r.forget, "controlled_recovery", "high"),
            "verified_flag": r.verified, "control": r.control, "audited_flag": r.audited,
        })
    columns = [c.id for c in COLUMNS] + list(HIDDEN)
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.astype({"group_size": "Int64"})


#: Cells a spreadsheet would run as a formula (CSV injection); such text is prefixed with a quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def to_csv(frame: pd.DataFrame) -> bytes:
    shown = frame[[c.id for c in COLUMNS]].copy()
    for col in shown.columns:
        if not pd.api.types.is_numeric_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v)
    shown.columns = [c.label for c in COLUMNS]
    return shown.to_csv(index=False).encode("utf-8")
