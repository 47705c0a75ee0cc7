"""Random-relabel unlearning, a small third-party qubench method (the worked example of submissions/).

Amnesiac-style relabelling (Graves et al., 2021) adapted to language models: instead of pushing
the likelihood of the forget text down without bound, as gradient ascent does, the model is
fine-tuned on the forget windows with every next token replaced by its image under one fixed,
seeded random permutation of the vocabulary. The forget term is an ordinary, bounded cross-entropy
towards a consistent wrong continuation, so it overwrites the memorised text with noise instead of
exploding; the retain term (next-token NLL on retain text, weight `alpha`) keeps utility.

    loss = CE(model(forget), perm[next tokens]) + alpha * CE(model(retain), next tokens)

Everything else (optimiser, batching, seeding, saving) is qubench's shared loop.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from qubench.methods.losses import label_mask, logits_of
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

__version__ = "0.1.0"


class RandomRelabelConfig(TrainConfig):
    """The shared loop's settings with GA's defaults (qubench.methods.ga), plus the permutation seed."""

    lr: LearningRate = 1e-5
    epochs: Epochs = 10
    batch_size: BatchSize = 4
    grad_accum: GradAccum = 8
    max_len: MaxLen = None
    warmup_steps: WarmupSteps = 0
    max_grad_norm: MaxGradNorm = 1.0
    weight_decay: WeightDecay = 0.0
    max_steps: MaxSteps = None
    alpha: RetainWeight = 1.0
    permutation_seed: Annotated[int, Field(ge=0, description="seed of the vocabulary permutation")] = 0


def relabel(token_ids: torch.Tensor, vocab_size: int, seed: int) -> torch.Tensor:
    """Each token id mapped through a fixed random permutation of the vocabulary (no fixed points
    except by chance), the same for every batch and every run with the same seed."""
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    return perm[token_ids]


class RandomRelabel(LossBasedMethod):
    name = "random_relabel"
    description = "Fine-tune forget text towards a fixed random permutation of its next tokens, plus retain NLL."
    Config = RandomRelabelConfig
    retain_term = "gdr"

    def forget_loss(self, model, reference, forget):
        logits = logits_of(model, forget)[:, :-1]
        targets = relabel(forget.input_ids[:, 1:], logits.shape[-1], self.config.permutation_seed)
        mask = label_mask(forget)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none").view_as(mask)
        return (nll * mask).sum() / mask.sum()
