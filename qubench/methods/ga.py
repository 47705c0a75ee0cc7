"""Gradient ascent (GA) and its retain-regularised variants, as MUSE's baselines define them.

ga      loss = -CE(model, forget)
ga_gdr  loss = -CE(model, forget) + alpha * CE(model, retain)
ga_klr  loss = -CE(model, forget) + alpha * KL(P_target || P_model) on retain
"""

from __future__ import annotations

from qubench.methods.losses import gradient_ascent_loss
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


class GAConfig(TrainConfig):
    """GA defaults: MUSE's unlearning scripts (lr 1e-5 constant, AdamW, 10 epochs, 4 windows per
    GPU on 8 GPUs = 32 per step, here 4 x grad_accum 8; HF Trainer's clipping at 1.0, no weight
    decay, no warmup). Recalibrate for the tiny default model HERE."""

    lr: LearningRate = 1e-5
    epochs: Epochs = 10
    batch_size: BatchSize = 4
    grad_accum: GradAccum = 8
    max_len: MaxLen = None
    warmup_steps: WarmupSteps = 0
    max_grad_norm: MaxGradNorm = 1.0
    weight_decay: WeightDecay = 0.0
    max_steps: MaxSteps = None


class GARetainConfig(GAConfig):
    alpha: RetainWeight = 1.0  # MUSE adds the retain term unweighted


class GA(LossBasedMethod):
    name = "ga"
    description = "Gradient ascent on the forget set's next-token NLL (MUSE baseline)."
    Config = GAConfig

    def forget_loss(self, model, reference, forget):
        return gradient_ascent_loss(model, forget)


class GA_GDR(GA):
    name = "ga_gdr"
    description = "Gradient ascent on forget + gradient descent on retain (MUSE baseline)."
    Config = GARetainConfig
    retain_term = "gdr"


class GA_KLR(GA):
    name = "ga_klr"
    description = "Gradient ascent on forget + KL to the target on retain (MUSE baseline)."
    Config = GARetainConfig
    retain_term = "klr"
