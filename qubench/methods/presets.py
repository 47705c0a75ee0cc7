"""Named presets of the quantization-robust methods, each a composition with its paper's settings.

quail = ga_gdr+hinge  (arXiv 2601.15538) QUAIL builds on GA+GDR; gamma = 8 (its best
                      setting), delta_q = 1.0, every vocabulary logit (K = vocab).
sure  = ga_gdr+sure   (arXiv 2410.16454, section 6) the paper applies SURE to every
                      regularised method (GA_GDR, GA_KLR, NPO_GDR, NPO_KLR; the authors'
                      code offers all four); GA_GDR is the default here. Module-level
                      mask at the 90th percentile (the authors' example), lr 1e-4.
lora  = ga_gdr+lora   (arXiv 2602.13151) r = 32, alpha = 32, dropout 0.05 on
                      q/k/v/o/gate/up/down, lr 1e-4.

The other settings (epochs, batch, alpha = 1, ...) are the base's MUSE defaults.
Every setting can be overridden like any method parameter; results record
the preset's name and its composition (`params()["composition"]`).
"""

from __future__ import annotations

from qubench.methods.compose import compose


class QUAIL(compose("ga_gdr+hinge")):
    name = "quail"
    description = ("QUAIL: GA+GDR plus a logit hinge keeping forget logits delta_q/2 from the target's "
                   "(arXiv 2601.15538).")


class SURE(compose("ga_gdr+sure")):
    name = "sure"
    description = "SURE: GA+GDR on the forget-salient Linear modules only, lr 1e-4 (arXiv 2410.16454, section 6)."


class LoRA(compose("ga_gdr+lora")):
    name = "lora"
    description = "GA+GDR through LoRA adapters (r=32) merged into the weights before saving (arXiv 2602.13151)."
