"""The damage-controlled recovery and its hierarchical, paired bootstrap: hand-computed values, the two
known answers (retrain 0%, a model quantized onto the quantized target 100%), and the interval's coverage
on synthetic data whose true recovery is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qubench import recovery
from qubench.grid.bootstrap import SeedProbes, figures, hierarchical_intervals
from qubench.results import metric_row


def test_controlled_recovery_by_hand():
    # positions: before (60-20)/(80-20) = 2/3; after (62-22)/(70-22) = 5/6; share of the rest taken back:
    # (5/6 - 2/3) / (1 - 2/3) = 1/2. The paper's figure, against the full-precision target: 2/20 = 10%.
    row = metric_row(pre=60.0, post=62.0, target_pre=80.0, target_post=70.0, retrain=20.0, retrain_post=22.0)
    assert row.position_pre == pytest.approx(2 / 3) and row.position_post == pytest.approx(5 / 6)
    assert row.controlled_recovery == pytest.approx(0.5) and row.recovery == pytest.approx(0.1)
    assert row.controlled_recovery_note is None


def test_the_retrain_model_recovers_nothing_and_the_control_everything():
    retrain = metric_row(pre=20.0, post=22.0, target_pre=80.0, target_post=70.0, retrain=20.0, retrain_post=22.0)
    assert retrain.controlled_recovery == 0.0
    control = metric_row(pre=30.0, post=70.0, target_pre=80.0, target_post=70.0, retrain=20.0, retrain_post=22.0)
    assert control.controlled_recovery == pytest.approx(1.0)
    # The paper's figure for the same control: (70 - 30) / (80 - 30) = 80%, the quantizer's own damage mixed in.
    assert control.recovery == pytest.approx(0.8)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"retrain_post": None}, "needs the retrain model measured at full precision and quantized"),
    ({"retrain": 79.5}, "target and retrain differ by 0.5 < 1 at full precision"),
    ({"retrain_post": 69.6}, "quantizer erased the separation itself"),
    ({"pre": 79.8}, "unlearning moved this metric by 0.2 < 1"),
])
def test_controlled_recovery_is_undefined_inside_the_noise_floor_and_says_why(kwargs, says):
    values = {"pre": 60.0, "post": 62.0, "target_pre": 80.0, "target_post": 70.0, "retrain": 20.0,
              "retrain_post": 22.0, **kwargs}
    row = metric_row(**values)
    assert row.controlled_recovery is None and says in row.controlled_recovery_note


def test_resampled_auc_equals_sklearn_without_resampling():
    rng = np.random.default_rng(1)
    forget, holdout = rng.normal(1, 1, 30).round(1), rng.normal(2, 1, 20).round(1)  # rounded: ties happen
    probes = SeedProbes("auc", 1.0, {"m": forget}, {"m": holdout})
    value = probes.values(np.ones((1, 30)), np.ones((1, 20)))["m"][0]
    labels = [0] * 30 + [1] * 20
    assert value == pytest.approx(roc_auc_score(labels, -np.concatenate([forget, holdout])))
    # on PrivLeak's scale, relative to a reference AUC
    scaled = SeedProbes("auc", 1.0, {"m": forget}, {"m": holdout}, auc_reference=0.5)
    assert scaled.values(np.ones((1, 30)), np.ones((1, 20)))["m"][0] == pytest.approx((value - 0.5) / 0.5 * 100)


def test_figures_use_the_same_formulas_as_results():
    vals = {"pre": np.array([60.0]), "post": np.array([62.0]), "target_pre": np.array([80.0]),
            "target_post": np.array([70.0]), "retrain": np.array([20.0]), "retrain_post": np.array([22.0])}
    out = figures(vals, floor=1.0)
    assert out["controlled_recovery"][0] == pytest.approx(0.5) and out["recovery"][0] == pytest.approx(0.1)
    assert np.isnan(recovery.controlled_recovery(60, 62, 80, 70, 79.5, 22, 1.0))


# Population means of the six models (0..1 scores). As in real runs: every probe has a difficulty shared by
# every model (why the resampling must be paired), model-specific probe effects shared by every seed (a
# document one target memorises, every target trained on it memorises), seed effects on how deep the
# unlearning went, and per-seed noise.
MEANS = {"target_pre": 0.80, "target_post": 0.70, "retrain": 0.20, "retrain_post": 0.25, "pre": 0.50, "post": 0.50}
SEED_SD = 0.06  # a seed moves the unlearned model's scores by b before and 0.8 b after quantization


def _recovery_at(b):
    shifted = {**MEANS, "pre": MEANS["pre"] + b, "post": MEANS["post"] + 0.8 * b}
    return figures({k: np.asarray(v) for k, v in shifted.items()}, 0.01)["controlled_recovery"]


# The estimand: the expected controlled recovery over seeds, at the probe population's means.
TRUE = float(np.mean(_recovery_at(np.random.default_rng(0).normal(0, SEED_SD, 400_000))))


def _synthetic_seeds(rng, n_seeds=3, n_probes=100, shared=0.15, noise=0.05, seed_sd=SEED_SD):
    difficulty = rng.normal(0, 0.2, n_probes)
    effects = {label: rng.normal(0, shared, n_probes) for label in MEANS}
    seeds = []
    for _ in range(n_seeds):
        b = rng.normal(0, seed_sd)
        shift = {"pre": b, "post": 0.8 * b}
        seeds.append(SeedProbes("mean", 1.0, {label: mu + shift.get(label, 0.0) + difficulty + effects[label]
                                              + rng.normal(0, noise, n_probes) for label, mu in MEANS.items()}, {}))
    return seeds


def test_the_interval_covers_the_true_recovery_at_its_nominal_rate():
    assert 0.1 < TRUE < 0.13  # 1/9 at the mean seed; the ratio's curvature adds a little
    rng = np.random.default_rng(11)
    replicates, covered, widths, estimates = 200, 0, [], []
    for r in range(replicates):
        seeds = _synthetic_seeds(rng)
        estimates.append(np.mean([figures({k: np.array([v.mean()]) for k, v in s.scores.items()}, 0.01)
                                  ["controlled_recovery"][0] for s in seeds]))
        ci = hierarchical_intervals(seeds, floor=0.01, resamples=800, seed=r)["controlled_recovery"]
        covered += ci.low <= TRUE <= ci.high
        widths.append(ci.high - ci.low)
    coverage = covered / replicates
    # 95% nominal; with 200 replicates the binomial sd is 1.5 points
    assert 0.91 <= coverage <= 0.99, coverage
    # and the width matches the estimator's real spread (a normal 95% interval is 3.92 sd wide)
    assert 0.75 < np.median(widths) / 3.92 / np.std(estimates) < 1.3


def test_pairing_matters_resampling_models_independently_would_be_far_wider():
    rng = np.random.default_rng(3)
    seeds = _synthetic_seeds(rng, shared=0.03, noise=0.02)
    paired = hierarchical_intervals(seeds, floor=0.01, resamples=1000)["controlled_recovery"]
    # Unpaired: each model's probes resampled on their own (simulated by shuffling probes per model).
    shuffled = [SeedProbes("mean", 1.0, {k: rng.permutation(v) for k, v in s.scores.items()}, {}) for s in seeds]
    unpaired = hierarchical_intervals(shuffled, floor=0.01, resamples=1000)["controlled_recovery"]
    assert (paired.high - paired.low) * 3 < (unpaired.high - unpaired.low)


def test_one_seed_still_gets_a_probe_level_interval_and_undefined_figures_get_none():
    rng = np.random.default_rng(0)
    [seed] = _synthetic_seeds(rng, n_seeds=1)
    interval = hierarchical_intervals([seed], floor=0.01, resamples=500)
    assert interval["controlled_recovery"].low < TRUE < interval["controlled_recovery"].high
    flat = SeedProbes("mean", 1.0, {k: np.full(50, 0.5) for k in MEANS}, {})  # nothing separates anything
    none = hierarchical_intervals([flat], floor=0.01, resamples=200)["controlled_recovery"]
    assert none.low is None and none.resamples == 0
