"""The pipeline's stages as objects (see `qubench.stages.base`): task data -> target/retrain models ->
unlearned model -> quantized checkpoints -> evaluations, plus the cached inputs some stages share
(downloads, the QUAIL hinge's logits and margins). `STAGE_KINDS` maps each cache kind to its class."""

# Imported in pipeline order, which is the order stage kinds register in (and `qubench cache ls` lists).
from qubench.stages.base import STAGE_KINDS, Stage
from qubench.stages.data import Download, TaskData
from qubench.stages.models import ExistingModels, PreparedModels, TrainedModels
from qubench.stages.unlearned import Unlearned
from qubench.stages.external import CHECK_STEP, ExternalUnlearned, Merged
from qubench.stages.hinge import HingeLogits, HingeMargin
from qubench.stages.quantized import Quantized
from qubench.stages.evaluation import Evaluation

#: Cache kinds that are not stages: bookkeeping a run also writes under QUBENCH_HOME.
OTHER_KINDS = {"hashes": "remembered content digests of files (fingerprint memo)",
               "logs": "logs of servers qubench started (vLLM)",
               "unsaved_results": "results of finished runs whose results folder could not take them"}


def step_is_group_shared(step: str) -> bool:
    """Whether a failure in pipeline step `step` fails every cell of a grid group (see Stage.group_shared).
    An audit's input checks are about the checkpoint and the target, which every quantizer of the group shares."""
    return step == CHECK_STEP or any(cls.group_shared for cls in STAGE_KINDS.values() if cls.step == step)


__all__ = ["STAGE_KINDS", "OTHER_KINDS", "Stage", "Download", "TaskData", "Evaluation", "HingeLogits",
           "HingeMargin", "ExistingModels", "ExternalUnlearned", "Merged", "PreparedModels", "TrainedModels",
           "Quantized", "Unlearned", "step_is_group_shared"]
