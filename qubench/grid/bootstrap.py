"""Intervals that mean something with few seeds: a hierarchical bootstrap, paired across models.

A percentile bootstrap over 3 seed means has only 10 distinct resamples. Every run logs the per-probe
scores of its forget metrics for every model it measured (`RunResult.probes`), so a resample here draws
seeds with replacement (the outer level) and the task's probes with replacement (the inner level). The
same probe indices serve the target, the retrain model, the unlearned model, before and after
quantization: a recovery's numerator and denominator move together, as they do in the data. The seeds
of a task share its probes, so one probe draw serves every seed of a resample (probes and seeds are
crossed, not nested: resampling probes anew per seed would count the probe-sampling variance again in
every seed, and the intervals would over-cover). Each resample recomputes every seed's figures with the formulas of
`qubench.recovery` and averages them over the drawn seeds; the interval is the percentile interval of
those averages. Resamples in which a figure is undefined (a denominator inside the noise floor) are
left out and counted.

The estimator's behaviour is pinned by a coverage test on synthetic data with a known answer
(tests/test_bootstrap.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qubench import recovery

#: Labels of the models a run measures, as in `RunResult.probes`.
MODELS = ("target_pre", "target_post", "retrain", "retrain_post", "pre", "post")
FIGURES = ("recovery", "controlled_recovery")
METHOD = ("hierarchical bootstrap: seeds resampled, then probes within each seed, paired across the models of "
          "the seed (target, retrain, unlearned; before and after quantization)")


@dataclass
class SeedProbes:
    """One seed's per-probe scores of one metric (see `results.ProbeScores`), ready to resample."""

    statistic: str                       # "mean" or "auc"
    scale: float
    scores: dict[str, np.ndarray]        # label -> per-probe scores (forget documents for "auc")
    holdout: dict[str, np.ndarray]       # "auc" only: label -> holdout documents' scores
    auc_reference: float | None = None   # "auc" metrics on PrivLeak's scale: (AUC - ref) / ref x 100

    @classmethod
    def from_result(cls, probes, auc_reference: float | None = None) -> "SeedProbes":
        as_arrays = lambda d: {k: np.asarray(v, dtype=float) for k, v in d.items()}
        return cls(probes.statistic, probes.scale, as_arrays(probes.scores), as_arrays(probes.holdout),
                   auc_reference)

    def sizes(self) -> tuple[int, int]:
        n = len(next(iter(self.scores.values())))
        return n, (len(next(iter(self.holdout.values()))) if self.holdout else 0)

    def values(self, counts: np.ndarray, holdout_counts: np.ndarray | None) -> dict[str, np.ndarray]:
        """Every model's metric value under each resample: `counts` (B, n) says how often each probe was
        drawn (each row sums to n); for "auc", `holdout_counts` does the same for holdout documents."""
        n = counts.shape[1]
        if self.statistic == "mean":
            return {label: counts @ s / n * self.scale for label, s in self.scores.items()}
        out = {}
        for label, forget in self.scores.items():
            holdout = self.holdout[label]
            # AUC of holdout (member) vs forget (non-member) on -score, as sklearn computes it: the share of
            # (forget, holdout) pairs the holdout document wins, ties counting one half. Pair weights are fixed,
            # so a resample's AUC is the count-weighted mean of this matrix.
            wins = (holdout[None, :] < forget[:, None]) + 0.5 * (holdout[None, :] == forget[:, None])
            auc = ((counts @ wins) * holdout_counts).sum(axis=1) / (n * holdout_counts.shape[1])
            ref = self.auc_reference
            out[label] = auc if ref is None else (auc - ref) / ref * 100
        return out


def figures(values: dict[str, np.ndarray], floor: float) -> dict[str, np.ndarray]:
    """Both recoveries from model values (arrays), NaN where undefined; missing models give NaN."""
    get = lambda label: values.get(label, np.nan)
    return {
        "recovery": recovery.paper_recovery(get("pre"), get("post"), get("target_pre"), floor),
        "controlled_recovery": recovery.controlled_recovery(get("pre"), get("post"), get("target_pre"),
                                                            get("target_post"), get("retrain"),
                                                            get("retrain_post"), floor),
    }


@dataclass
class Interval:
    low: float | None
    high: float | None
    resamples: int          # resamples in which the figure was defined
    of: int


def hierarchical_intervals(seeds: list[SeedProbes], floor: float, confidence: float = 0.95,
                           resamples: int = 2000, seed: int = 0) -> dict[str, Interval]:
    """Percentile intervals of the seed-mean of each figure in FIGURES under the two-level resampling."""
    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    draws: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    per_seed = []
    for s in seeds:
        # Seeds of one task share its probes: one probe resample serves every seed (crossed design), so the
        # probe-sampling variance is counted once, not once per seed.
        n, m = s.sizes()
        if (n, m) not in draws:
            draws[(n, m)] = (rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(float),
                             rng.multinomial(m, np.full(m, 1 / m), size=resamples).astype(float) if m else None)
        per_seed.append(figures(s.values(*draws[(n, m)]), floor))
    drawn = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # the outer level: which seeds
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name in FIGURES:
        table = np.stack([f[name] for f in per_seed])                # (seeds, resamples)
        picked = table[drawn, np.arange(resamples)[:, None]]        # (resamples, drawn seeds)
        with np.errstate(invalid="ignore"), _quiet():
            means = np.nanmean(picked, axis=1)
        valid = means[np.isfinite(means)]
        if len(valid) < resamples / 2:  # mostly undefined: an interval of the rest would mislead
            out[name] = Interval(None, None, len(valid), resamples)
        else:
            low, high = np.percentile(valid, [tail, 100 - tail])
            out[name] = Interval(float(low), float(high), len(valid), resamples)
    return out


class _quiet:
    """numpy warns on a mean of an all-NaN row; such resamples are counted, not shouted about."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
