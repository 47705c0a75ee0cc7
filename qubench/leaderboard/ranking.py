"""The leaderboard's ranking rule, in one place, with the sentence the page shows."""

from __future__ import annotations

from collections import defaultdict

from qubench.leaderboard.rows import Row

#: A row is ranked only if its utility after quantization is at least (1 - margin) x the utility of
#: the target quantized the same way: forgetting bought by destroying the model does not count.
UTILITY_MARGIN = 0.10
#: ... and only if unlearning forgot something to survive: at full precision the unlearned model sits at
#: most this far from the target on the way to the retrain model (position_pre <= 1 - margin).
FORGETTING_MARGIN = 0.10

RULE = (
    "Rows are ranked within each setting (same task, quantizer, model, engine and evaluation settings) by how "
    "much of the forgetting quantization takes back: the damage-controlled recovery of the task's forget metric "
    "(VerbMem on the forget set; label accuracy on forget posts for classification tasks), which places the "
    "unlearned model between the retrain model (0) and the target (1) quantized the same way, mean over seeds, "
    "lower is better (0% = the forgetting survives quantization, 100% = quantization undoes it); ties go to the "
    "lower forget metric after quantization. Only rows that forgot something (at full precision at least "
    f"{FORGETTING_MARGIN:.0%} of the way from the target to the retrain model) and whose utility after "
    "quantization (the task's utility metric: KnowMem on retain for MUSE, VerbMem on retain for the CPU-scale "
    f"tasks whose tiny models answer no question; test accuracy for classification) stays within {UTILITY_MARGIN:.0%} "
    "of the quantized target's are ranked; nor are rows whose target does not remember the forget metric "
    "measurably more than the retrain model (the separation column): they cannot show forgetting. The others "
    "are listed without a rank, with the reason. The target and "
    "retrain rows are baselines and known-answer controls (e.g. +inbucket) are controls: both pinned at the top "
    "of their setting and never ranked. Checkpoints audited with `qubench audit` (method external:NAME: models "
    "unlearned elsewhere) are listed apart and never ranked, unless they come from a submission. Filters hide "
    "rows but do not change ranks."
)


def _setting_key(row: Row) -> tuple:
    return (row.task, row.quantizer, row.model, row.engine, row.evaluation, row.setting)


def forgetting_ok(row: Row) -> tuple[bool, str]:
    """Whether the row forgot something whose survival can be measured, and why not."""
    if row.forget is None:
        return False, "unranked: no forget metric"
    if row.forget.mean("controlled_recovery") is None:
        return False, "unranked: damage-controlled recovery undefined (see the results' notes)"
    position = row.forget.mean("position_pre")
    if position is not None and position > 1 - FORGETTING_MARGIN:
        return False, (f"unranked: forgot too little (position {position:.2f} > {1 - FORGETTING_MARGIN:.2f} "
                       "between retrain 0 and target 1)")
    return True, "ranked"


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
        controls = sorted((r for r in group if r.control and not r.baseline), key=lambda r: (r.method, r.source))
        for r in controls:
            r.rank, r.standing = None, "control (known answer, not ranked)"
        audited = sorted((r for r in group if r.audited and not r.baseline), key=lambda r: (r.method, r.source))
        for r in audited:
            r.rank, r.standing = None, "audited checkpoint: listed apart, not ranked (submit it to rank it)"
        eligible, unranked = [], []
        for r in group:
            if r.baseline or r.control or r.audited:
                continue
            ok, why = forgetting_ok(r)
            if ok:
                ok, why = utility_ok(r)
            if ok and r.separated is False:
                ok, why = False, "unranked: target not separated from retrain (see separation)"
            (eligible if ok else unranked).append(r)
            r.standing = why
        eligible.sort(key=lambda r: (r.forget.mean("controlled_recovery"), _or_inf(r.forget.mean("post")),
                                     r.method, r.source))
        for i, r in enumerate(eligible, start=1):
            r.rank = i
        for r in unranked:
            r.rank = None
        ordered += baselines + controls + eligible + sorted(unranked, key=lambda r: (r.method, r.source)) + audited
    return ordered


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value
