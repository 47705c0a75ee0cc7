"""Negative Preference Optimization (Zhang et al. 2024) and its retain-regularised variants.

npo      loss = -(2/beta) * mean_seq logsigmoid(-beta * (log p_model(seq) - log p_target(seq)))
npo_gdr  loss = NPO + alpha * CE(model, retain)
npo_klr  loss = NPO + alpha * KL(P_target || P_model) on retain
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from qubench.methods.losses import npo_loss
from qubench.methods.train_loop import (
    BatchSize,
    Epochs,
    GradAccum,
    LearningRate,
    LossBasedMethod,
    MaxGradNorm,
    MaxLen,
    MaxSteps,
    RetainWeight,
    TrainConfig,
    WarmupSteps,
    WeightDecay,
)

Beta = Annotated[float, Field(gt=0, description="NPO inverse temperature")]


class NPOConfig(TrainConfig):
    """NPO defaults: MUSE's scripts (same optimiser settings as GA, see ga.GAConfig) and
    beta = 0.1 as in MUSE and the NPO paper. Recalibrate for the tiny default model HERE."""

    lr: LearningRate = 1e-5
    epochs: Epochs = 10
    batch_size: BatchSize = 4
    grad_accum: GradAccum = 8
    max_len: MaxLen = None
    warmup_steps: WarmupSteps = 0
    max_grad_norm: MaxGradNorm = 1.0
    weight_decay: WeightDecay = 0.0
    max_steps: MaxSteps = None
    beta: Beta = 0.1


class NPORetainConfig(NPOConfig):
    alpha: RetainWeight = 1.0  # MUSE adds the retain term unweighted


class NPO(LossBasedMethod):
    name = "npo"
    description = "Negative Preference Optimization against the frozen target (MUSE baseline)."
    Config = NPOConfig
    forget_needs_reference = True

    def forget_loss(self, model, reference, forget):
        return npo_loss(model, reference, forget, beta=self.config.beta)


class NPO_GDR(NPO):
    name = "npo_gdr"
    description = "NPO on forget + gradient descent on retain (MUSE baseline)."
    Config = NPORetainConfig
    retain_term = "gdr"


class NPO_KLR(NPO):
    name = "npo_klr"
    description = "NPO on forget + KL to the target on retain (MUSE baseline)."
    Config = NPORetainConfig
    retain_term = "klr"
