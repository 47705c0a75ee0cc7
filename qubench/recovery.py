"""How much of what unlearning removed quantization brings back: the two recovery figures.

**Paper recovery** (arXiv 2410.16454's framing): `(post - pre) / (target_pre - pre)`, the quantized
unlearned model against the *full-precision* target. Quantization also erodes the target's own
memorisation, so this figure mixes in the quantizer's damage to the target (it reads -141% for a model
that quantization merely moves along with the references).

**Damage-controlled recovery**: place each model between the retrain reference (0) and the target (1)
*at the same precision*,

    position p = (m - m_retrain) / (m_target - m_retrain)

(full precision before, both references quantized by the same quantizer after), and report the share
of the remaining distance to the target that quantization takes back:

    controlled recovery = (p_post - p_pre) / (1 - p_pre)

It is 0 for the retrain model by construction, 100% for a model that quantizes exactly onto the
quantized target (the `+inbucket` control), and negative when quantization deepens the forgetting
relative to the references. Every figure is undefined (NaN here; None with a note in results) when one
of its denominators is within the metric's noise floor.

The functions work elementwise on floats or numpy arrays, so the bootstrap (`qubench.grid.bootstrap`)
resamples the very same formulas.
"""

from __future__ import annotations

import numpy as np

NAN = float("nan")


def paper_recovery(pre, post, target_pre, floor: float):
    """(post - pre) / (target_pre - pre); NaN where |target_pre - pre| < floor."""
    pre, post, target_pre = (np.asarray(x, dtype=float) for x in (pre, post, target_pre))
    forgotten = target_pre - pre
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(forgotten) >= floor, (post - pre) / forgotten, NAN)


def position(m, retrain, target, floor: float):
    """Where `m` sits between retrain (0) and target (1); NaN where the two are within `floor`."""
    m, retrain, target = (np.asarray(x, dtype=float) for x in (m, retrain, target))
    span = target - retrain
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(span) >= floor, (m - retrain) / span, NAN)


def controlled_recovery(pre, post, target_pre, target_post, retrain, retrain_post, floor: float):
    """(p_post - p_pre) / (1 - p_pre), positions at equal precision; NaN where undefined."""
    p_pre = position(pre, retrain, target_pre, floor)
    p_post = position(post, retrain_post, target_post, floor)
    forgotten = np.asarray(target_pre, dtype=float) - np.asarray(pre, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(forgotten) >= floor, (p_post - p_pre) / (1 - p_pre), NAN)


def controlled_note(pre, post, target_pre, target_post, retrain, retrain_post, floor: float) -> str | None:
    """Why the damage-controlled recovery of one row is undefined (None when it is defined)."""
    if retrain is None or retrain_post is None:
        return "undefined: needs the retrain model measured at full precision and quantized"
    if None in (pre, post, target_pre, target_post):
        return "undefined: a measurement is missing"
    if abs(target_pre - retrain) < floor:
        return (f"undefined: target and retrain differ by {abs(target_pre - retrain):.3g} < {floor:g} at full "
                "precision (the target does not remember this more than the retrain model)")
    if abs(target_post - retrain_post) < floor:
        return (f"undefined: quantized target and quantized retrain differ by {abs(target_post - retrain_post):.3g} "
                f"< {floor:g} (the quantizer erased the separation itself)")
    if abs(target_pre - pre) < floor:
        return f"undefined: unlearning moved this metric by {abs(target_pre - pre):.3g} < {floor:g}"
    return None
