"""The one catalogue of metrics: what each measures, where its probes come from, its scale and
direction. Evaluation (which lm-eval task yields it), scoring (which metrics get a row, the noise
floor of recovery), results (help text), the terminal report and the leaderboard (which metric
stands for forgetting and utility) all read it here. Adding a metric is one entry in `METRICS`
(plus, for a generation metric, its lm-eval task YAML under `qubench/lm_eval_tasks/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: forget: what unlearning must remove (recovery applies); utility: what the model must keep;
#: floor: what a model scores without having seen the data (the level forgetting should reach);
#: raw: an input of another metric, shown for transparency.
Role = Literal["forget", "utility", "floor", "raw"]
#: generation: lm-eval generate_until + ROUGE-L; membership: Min-K% log-probs; classification:
#: lm-eval multiple_choice accuracy.
View = Literal["generation", "membership", "classification"]


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    role: Role
    view: View
    probes: str                        # the data file(s) in the MUSE layout that it is measured on
    low: float                         # the range a valid value lies in (results outside are rejected)
    high: float
    #: +1: a higher value means more memorised (more of the forget data present); -1: lower means more
    #: memorised; 0: no memorisation reading (utility metrics say "higher = better" in their text).
    memorised: Literal[1, -1, 0]
    #: Below this much forgetting, in the metric's own units, recovery is a ratio of noise.
    min_forgetting: float = 1.0
    lm_eval_task: str | None = None    # the lm-eval task that produces it (generation, classification)
    muse: bool = False                 # one of MUSE's four reported metrics (expected of MUSE-style tasks)
    #: How the value follows from per-probe scores, so intervals can resample probes: "mean" (x scale) of
    #: the scores logged under the metric's name, "auc" of the PrivLeak forget vs holdout Min-K scores;
    #: None: no per-probe resampling (the value is derived, e.g. PrivLeak from its AUC).
    statistic: Literal["mean", "auc"] | None = None
    scale: float = 100.0
    #: The value is relative to the retrain model's: (AUC - AUC_retrain) / AUC_retrain x 100 (PrivLeak).
    relative_to_retrain: bool = False
    #: For a forget metric: the floor metric that measures the same kind of probe on never-trained data,
    #: i.e. what a model scores without having seen the forget set. The target is compared with it when
    #: no retrain model was measured (qubench.scoring.separation).
    floor: str | None = None


#: Display order. ROUGE and accuracy are x100; PrivLeak's percentage is bounded below by -100 and,
#: for an AUC_retrain of at least 0.01, above by 9900.
METRICS: tuple[Metric, ...] = (
    Metric("verbmem_f", "VerbMem on forget: ROUGE-L F1 x100 of the greedy continuation of forget text "
           "(lower = forgotten)", "forget", "generation", "verbmem/forget.json", 0, 100, 1,
           lm_eval_task="qubench_verbmem_forget", muse=True, statistic="mean", floor="verbmem_holdout"),
    Metric("knowmem_f", "KnowMem on forget: ROUGE-L F1 x100 of answers to questions about forget facts "
           "(lower = forgotten)", "forget", "generation", "knowmem/forget_qa.json", 0, 100, 1,
           lm_eval_task="qubench_knowmem_forget", muse=True, statistic="mean"),
    Metric("privleak", "PrivLeak: (AUC - AUC_retrain)/AUC_retrain x100, Min-40% forget vs holdout (0 = like "
           "retrain, strongly negative = forget set still detectable)", "forget", "membership",
           "privleak/forget.json, privleak/holdout.json", -100, 9900, -1, muse=True, statistic="auc",
           relative_to_retrain=True),
    Metric("knowmem_r", "KnowMem on retain: ROUGE-L F1 x100 on retain facts (utility; higher = better)",
           "utility", "generation", "knowmem/retain_qa.json", 0, 100, 0,
           lm_eval_task="qubench_knowmem_retain", muse=True),
    Metric("verbmem_r", "VerbMem on retain: ROUGE-L F1 x100 on retain text (utility the model should keep; "
           "higher = better)", "utility", "generation", "verbmem/retain.json", 0, 100, 0,
           lm_eval_task="qubench_verbmem_retain"),
    Metric("verbmem_holdout", "VerbMem on never-trained holdout text: what a model guesses without "
           "memorising (floor)", "floor", "generation", "verbmem/holdout.json", 0, 100, 0,
           lm_eval_task="qubench_verbmem_holdout"),
    Metric("privleak_auc", "Raw Min-40% AUC, forget (non-member) vs holdout (member)", "raw", "membership",
           "privleak/forget.json, privleak/holdout.json", 0, 1, -1, min_forgetting=0.01),
    Metric("cls_f", "Label accuracy x100 on forget posts (trained on; lower = forgotten, down to cls_holdout)",
           "forget", "classification", "classify/forget.json", 0, 100, 1,
           lm_eval_task="qubench_classify_forget", statistic="mean", floor="cls_holdout"),
    Metric("cls_holdout", "Label accuracy x100 on never-trained posts of the forget class (the floor "
           "forgetting should reach)", "floor", "classification", "classify/holdout.json", 0, 100, 0,
           lm_eval_task="qubench_classify_holdout"),
    Metric("cls_r", "Label accuracy x100 on retain posts (trained on; the model should keep it)", "utility",
           "classification", "classify/retain.json", 0, 100, 0, lm_eval_task="qubench_classify_retain"),
    Metric("cls_test", "Label accuracy x100 on a balanced never-trained test split (classification utility)",
           "utility", "classification", "classify/test.json", 0, 100, 0, lm_eval_task="qubench_classify_test"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
#: lm-eval task name -> metric, for every metric measured through an lm-eval task.
BY_LM_EVAL_TASK: dict[str, Metric] = {m.lm_eval_task: m for m in METRICS if m.lm_eval_task}


@dataclass(frozen=True)
class Headline:
    """The metrics a leaderboard row shows for one kind of task: the forgetting it ranks on, a second
    forgetting metric, and the utility it gates on (a task may declare its own utility metric)."""

    forget: str
    forget2: str | None
    utility: str


#: In order of preference: a run shows the first headline whose forget metric it has.
HEADLINES = (Headline("verbmem_f", "knowmem_f", "knowmem_r"), Headline("cls_f", None, "cls_test"))


def get(name: str) -> Metric:
    try:
        return BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(BY_NAME), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown metric {name!r}.{hint} Metrics: {', '.join(BY_NAME)}") from None


def names(role: Role | None = None, view: View | None = None) -> list[str]:
    """Metric names in display order, optionally only those of one role and/or view."""
    return [m.name for m in METRICS if (role is None or m.role == role) and (view is None or m.view == view)]


def help_text() -> dict[str, str]:
    return {m.name: m.description for m in METRICS}
