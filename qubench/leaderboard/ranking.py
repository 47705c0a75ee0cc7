"""The leaderboard's ranking rule, in one place, with the sentence the page shows."""

from __future__ import annotations

from collections import defaultdict

from qubench.leaderboard.rows import Row

#: A row is ranked only if its utility after quantization is at least (1 - margin) x the utility of
#: the target quantized the same way: forgetting bought by destroying the model does not count.
UTILITY_MARGIN = 0.10

RULE = (
    "Rows are ranked within each setting (same task, quantizer, model, engine and evaluation settings) by forgetting after "
    "quantization: the task's forget metric (VerbMem on the forget set; label accuracy on forget posts for "
    "classification tasks) measured on the quantized unlearned model, mean over seeds, lower is better; ties "
    "go to the smaller gap (post - pre). Only rows whose utility after quantization (the task's utility metric: KnowMem on retain "
    "for MUSE, VerbMem on retain for the CPU-scale tasks whose tiny models answer no question; "
    f"test accuracy for classification) stays within {UTILITY_MARGIN:.0%} of the quantized target's utility "
    "are ranked; the others are listed without a rank. Nor are rows whose target does not remember the forget "
    "metric measurably more than the retrain model (the separation column): they cannot show forgetting. "
    "The target and retrain rows are baselines: pinned at "
    "the top of their setting and never ranked. Filters hide rows but do not change ranks."
)


def _setting_key(row: Row) -> tuple:
    return (row.task, row.quantizer, row.model, row.engine, row.evaluation, row.setting)


def utility_ok(row: Row) -> tuple[bool, str]:
    """Whether the row keeps its utility, and the reason shown when it does not."""
    if row.utility is None:
        return False, "unranked: no utility metric"
    post, target = row.utility.mean("post"), row.utility.mean("target_post")
    if post is None or target is None:
        return False, "unranked: utility not measured after quantization"
    floor = (1 - UTILITY_MARGIN) * target
    if post < floor:
        return False, f"unranked: utility {post:.1f} < {floor:.1f} ({1 - UTILITY_MARGIN:.0%} of the quantized target's)"
    return True, "ranked"


def rank(rows: list[Row]) -> list[Row]:
    """Rows with `rank` and `standing` set, ordered: by setting, baselines first, then by rank."""
    by_setting: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        by_setting[_setting_key(row)].append(row)
    ordered: list[Row] = []
    for key in sorted(by_setting):
        group = by_setting[key]
        baselines = sorted((r for r in group if r.baseline), key=lambda r: (r.method != "target", r.source))
        for r in baselines:
            r.rank, r.standing = None, f"baseline ({r.method})"
        eligible, unranked = [], []
        for r in group:
            if r.baseline:
                continue
            ok, why = utility_ok(r)
            post = r.forget.mean("post") if r.forget is not None else None
            if ok and post is None:
                ok, why = False, "unranked: forgetting not measured after quantization"
            if ok and r.separated is False:
                ok, why = False, "unranked: target not separated from retrain (see separation)"
            (eligible if ok else unranked).append(r)
            r.standing = why
        eligible.sort(key=lambda r: (r.forget.mean("post"), _or_inf(r.forget.mean("gap")), r.method, r.source))
        for i, r in enumerate(eligible, start=1):
            r.rank = i
        for r in unranked:
            r.rank = None
        ordered += baselines + eligible + sorted(unranked, key=lambda r: (r.method, r.source))
    return ordered


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value
